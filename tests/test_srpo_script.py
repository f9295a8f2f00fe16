"""srpo_openvla_oft.py as a user runs it: a subprocess on real LIBERO with tiny models, resume, eval, torchrun."""

import json
import os
import subprocess
import sys

import pytest
from eval_checks import check_evaluation
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = [
    "--suite",
    "libero_spatial",
    "--task-ids",
    "0",
    "--num-envs",
    "2",
    "--group-size",
    "2",
    "--tasks-per-iteration",
    "1",
    "--no-dynamic-sampling",
    "--max-episode-steps",
    "8",
    "--camera-size",
    "64",
    "--world-model-frames",
    "8",
    "--lora-rank",
    "4",
    "--micro-batch-size",
    "2",
    "--eval-init-states",
    "1",
]


def run(cmd, **kw):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_train_checkpoint_resume_and_eval(tiny_oft, tiny_vjepa2, tmp_path):
    oft, vjepa = tiny_oft, tiny_vjepa2
    base = [
        sys.executable,
        "srpo_openvla_oft.py",
        "--model-path",
        oft,
        "--world-model-path",
        vjepa,
        "--run-dir",
        str(tmp_path),
        "--exp-name",
        "t",
        *TINY_RUN,
    ]
    out = run(base + ["--total-iterations", "2", "--save-interval", "1", "--eval-interval", "2"])
    assert "iter 2:" in out and "eval" in out
    run_path = tmp_path / "t__s1"
    ckpts = run_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000001", "step_00000002"]
    step1 = load_file(ckpts / "step_00000001" / "adapter_model.safetensors")
    assert step1 and all("lora_" in k for k in step1)
    assert os.listdir(run_path / "videos")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_path))

    out = run(base + ["--total-iterations", "3", "--eval-interval", "0", "--no-env-workers", "--resume", str(ckpts)])
    assert "at iteration 2" in out and "iter 3:" in out and "iter 1:" not in out and "iter 2:" not in out
    assert (ckpts / "latest").read_text().strip() == "step_00000003"

    out = run(
        [
            sys.executable,
            "srpo_openvla_oft.py",
            "--eval-only",
            "--checkpoint",
            str(ckpts),
            "--run-dir",
            str(tmp_path),
            "--exp-name",
            "e",
            *TINY_RUN,
        ]
    )
    metrics = json.loads(out.strip().splitlines()[-1])
    assert {"eval/success_rate", "eval/libero_spatial/success_rate", "eval/libero_spatial/task_00_success_rate"} <= set(
        metrics
    )
    records, summary = check_evaluation(tmp_path / "e__s1", 3, 1, metrics, ("init_state", "video"))
    assert records[0]["task"] == "libero_spatial/task_00" and records[0]["init_state"] == 0
    assert (tmp_path / "e__s1" / records[0]["video"]).exists()  # the one episode is the success or failure video
    assert summary["flags"]["suite"] == "libero_spatial" and summary["flags"]["task_ids"] == [0]


def test_bad_input_fails_before_any_work(tiny_oft, tiny_vjepa2, tmp_path):
    import srpo_openvla_oft

    oft, vjepa = tiny_oft, tiny_vjepa2
    for flags, message in [
        (dict(suite="libero_100"), "libero_spatial"),
        (dict(suite="libero_spatial", task_ids=[12]), "0: pick_up_the_black_bowl"),
        (dict(suite="libero_10", unnorm_key="libero_10_no_noops"), "libero_spatial_no_noops"),
        (dict(suite="libero_spatial", world_model_path=oft), "not V-JEPA 2"),
        (dict(suite="libero_spatial", mujoco_gl="vulkan"), "osmesa"),
        (dict(suite="libero_spatial", num_envs=3), "--num-envs"),
        (dict(suite="libero_spatial", pipeline_stages=0), "--pipeline-stages must be >= 1"),
    ]:
        args = srpo_openvla_oft.Args(
            **{"model_path": oft, "world_model_path": vjepa, "run_dir": str(tmp_path), **flags}
        )
        with pytest.raises((ValueError, FileNotFoundError, RuntimeError), match=message):
            srpo_openvla_oft.main(args)


def test_torchrun_two_ranks_full_finetuning(tiny_oft, tiny_vjepa2, tmp_path):
    oft, vjepa = tiny_oft, tiny_vjepa2
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "2",
        "srpo_openvla_oft.py",
        "--model-path",
        oft,
        "--world-model-path",
        vjepa,
        "--run-dir",
        str(tmp_path),
        "--exp-name",
        "ddp",
        *TINY_RUN,
        "--tasks-per-iteration",
        "2",
        "--no-env-workers",
        "--total-iterations",
        "1",
        "--eval-interval",
        "0",
        "--lora-rank",
        "0",
    ]
    out = run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "2 rank(s)" in out and "iter 1:" in out  # the save raises if the ranks' weights differ after the update
    model = tmp_path / "ddp__s1" / "checkpoints" / "step_00000001" / "model"  # full fine-tuning: the OFT layout
    assert (model / "config.json").exists() and (model / "dataset_statistics.json").exists()
