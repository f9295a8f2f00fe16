"""bench/gpu_check.py at tiny shapes on CPU: every model part runs and reports finite numbers; the simulator and
end-to-end parts are left out here (the simulators have their own tests), the CUDA-only one reports a skip."""

import json
import math
import time

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
            "--oft-batch-sizes",
            "2",
            "--parts",
            "param_counts",
            "ppo_rollout",
            "ppo_update",
            "oft_forward_backward",
            "grpo_decoding",
            "grpo_update",
            "vjepa2_embed",
            "maniskill_gpu",
        ]
    )
    results = json.loads(out.read_text())
    assert results["size"] == "tiny" and results["device"] == "cpu"
    assert results["versions"]["transformers"].split(".")[0] == "5"
    parts = results["parts"]
    for name in [p for p in gpu_check.MODEL_PARTS if p != "fsdp_step"]:  # that one is torchrun: test_fsdp.py
        assert parts[name]["status"] == "ok", parts[name].get("traceback")
    assert 7.0e9 < parts["param_counts"]["openvla_7b_params"] < 8.0e9
    assert parts["param_counts"]["internvl3_1b_params"] < parts["param_counts"]["internvl3_2b_params"]
    rollout = parts["ppo_rollout"]["batch2"]
    for key in ("actions_per_s", "ms_per_step", "prefill_ms", "prefill_tflops", "peak_mem_gib"):
        assert _finite(rollout[key]) and rollout[key] > 0, key
    for key in ("s_per_step", "samples_per_s", "peak_mem_gib"):
        assert _finite(parts["ppo_update"][key]), key
    assert 0 < rollout["prefill_ms"] < rollout["ms_per_step"]
    for key in ("forward_ms", "forward_backward_ms", "chunks_per_s"):
        assert _finite(parts["oft_forward_backward"]["batch2"][key]), key
    for key in ("s_per_step", "samples_per_s"):
        assert _finite(parts["grpo_update"][key]) and parts["grpo_update"][key] > 0, key
    assert _finite(parts["vjepa2_embed"]["ms_per_video"]) and parts["vjepa2_embed"]["videos"] == 2
    decoding = parts["grpo_decoding"]["batch2"]
    for key in ("constrained_tokens_per_s", "generate_tokens_per_s", "speedup"):
        assert _finite(decoding[key]) and decoding[key] > 0, key
    assert parts["maniskill_gpu"]["status"] == "skipped" and "CUDA" in parts["maniskill_gpu"]["reason"]


def test_gpu_check_writes_each_part_and_stops_a_slow_one(tmp_path, monkeypatch):
    """The JSON holds every finished part while later ones run, and a part past --part-timeout-s is stopped and
    reported without stopping the next."""
    out, seen = tmp_path / "gpu_check.json", {}

    def slow(ctx):
        seen["during_slow"] = json.loads(out.read_text())["parts"]
        time.sleep(30)
        return {}

    monkeypatch.setattr(gpu_check, "part_ppo_rollout", slow)
    monkeypatch.setattr(gpu_check, "part_ppo_update", lambda ctx: {"ran": True})
    args = ["--size", "tiny", "--out", str(out), "--part-timeout-s", "2"]
    gpu_check.main(args + ["--parts", "maniskill_gpu", "ppo_rollout", "ppo_update"])
    assert seen["during_slow"]["maniskill_gpu"]["status"] == "skipped"  # written before the next part started
    parts = json.loads(out.read_text())["parts"]
    assert parts["ppo_rollout"]["status"] == "timeout" and parts["ppo_rollout"]["part_s"] < 10
    assert "--part-timeout-s 2" in parts["ppo_rollout"]["error"]
    assert parts["ppo_update"] == {"ran": True, "status": "ok", "part_s": parts["ppo_update"]["part_s"]}
