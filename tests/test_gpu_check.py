"""bench/gpu_check.py at tiny shapes on CPU: every model part runs and reports finite numbers; the simulator and
end-to-end parts are left out here (the simulators have their own tests), the CUDA-only one reports a skip."""

import json
import math

from bench import gpu_check


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_gpu_check_tiny(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(
        [
            "--size",
            "tiny",
            "--out",
            str(out),
            "--rollout-batch-sizes",
            "2",
            "--decode-batch-sizes",
            "2",
            "--parts",
            "param_counts",
            "ppo_rollout",
            "ppo_update",
            "oft_forward_backward",
            "grpo_decoding",
            "maniskill_gpu",
        ]
    )
    results = json.loads(out.read_text())
    assert results["size"] == "tiny" and results["device"] == "cpu"
    parts = results["parts"]
    for name in ("param_counts", "ppo_rollout", "ppo_update", "oft_forward_backward", "grpo_decoding"):
        assert parts[name]["status"] == "ok", parts[name].get("traceback")
    assert 7.0e9 < parts["param_counts"]["openvla_7b_params"] < 8.0e9
    assert parts["param_counts"]["internvl3_1b_params"] < parts["param_counts"]["internvl3_2b_params"]
    rollout = parts["ppo_rollout"]["batch2"]
    for key in ("actions_per_s", "ms_per_step", "achieved_tflops", "peak_mem_gib"):
        assert _finite(rollout[key]) and rollout[key] > 0, key
    for key in ("s_per_step", "samples_per_s", "peak_mem_gib"):
        assert _finite(parts["ppo_update"][key]), key
    for key in ("forward_ms", "forward_backward_ms", "chunks_per_s"):
        assert _finite(parts["oft_forward_backward"][key]), key
    decoding = parts["grpo_decoding"]["batch2"]
    for key in ("constrained_tokens_per_s", "generate_tokens_per_s", "speedup"):
        assert _finite(decoding[key]) and decoding[key] > 0, key
    assert parts["maniskill_gpu"]["status"] == "skipped" and "CUDA" in parts["maniskill_gpu"]["reason"]
