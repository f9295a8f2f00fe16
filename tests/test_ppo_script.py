"""ppo_openvla.py as a user runs it: a subprocess on the real simulator with a tiny model, resume, torchrun."""

import os
import subprocess
import sys

import pytest
import torch
from eval_checks import check_evaluation
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = [
    "--env-id",
    "PushCube-v1",
    "--num-envs",
    "2",
    "--num-steps",
    "4",
    "--max-episode-steps",
    "4",
    "--num-minibatches",
    "2",
    "--micro-batch-size",
    "2",
    "--lora-rank",
    "4",
    "--image-size",
    "64",
]


def run(cmd, **kw):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_train_checkpoint_resume_and_eval(tiny_openvla, tmp_path):
    base = [
        sys.executable,
        "ppo_openvla.py",
        "--model-path",
        tiny_openvla,
        "--run-dir",
        str(tmp_path),
        "--exp-name",
        "t",
        *TINY_RUN,
    ]
    out = run(base + ["--total-iterations", "2", "--save-interval", "1", "--eval-interval", "2", "--capture-video"])
    assert "iter 2:" in out and "eval" in out
    ckpts = tmp_path / "t__s1" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000001", "step_00000002"]
    step1 = load_file(ckpts / "step_00000001" / "adapter_model.safetensors")
    assert step1 and all("lora_" in k for k in step1)
    assert os.listdir(tmp_path / "t__s1" / "videos")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "t__s1")).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "actor/pg_loss",
        "critic/value_loss",
        "actor/entropy",
        "actor/grad_norm",
        "actor/approx_kl",
        "actor/clipfrac",
        "actor/lr",
        "rollout/reward_mean",
        "rollout/success_rate",
        "rollout/episode_length",
        "eval/success_rate",
        "eval/success_at_end",
        "time/env_steps_per_s",
        "time/actions_per_s",
        "time/update_samples_per_s",
    }
    assert expected <= tags, expected - tags
    logged = {tag: events.Scalars(tag)[-1].value for tag in ("eval/success_rate", "eval/success_at_end")}
    records, summary = check_evaluation(tmp_path / "t__s1", 2, 2, logged, ("seed", "success_at_end", "return"))
    assert summary["success_at_end"]["successes"] == sum(r["success_at_end"] for r in records)
    assert logged["eval/success_at_end"] == pytest.approx(summary["success_at_end"]["success_rate"])
    assert all(r["length"] == 4 and r["temperature"] == 0.6 for r in records)

    # Resuming from iteration 1 replays iteration 2 exactly: same env seeds, sampling, minibatches and optimizer state.
    resumed = [a if a != "t" else "r" for a in base]
    out = run(resumed + ["--total-iterations", "2", "--eval-interval", "0", "--resume", str(ckpts / "step_00000001")])
    assert "at iteration 1" in out and "iter 2:" in out and "iter 1:" not in out
    step2 = load_file(ckpts / "step_00000002" / "adapter_model.safetensors")
    step2_resumed = load_file(tmp_path / "r__s1" / "checkpoints" / "step_00000002" / "adapter_model.safetensors")
    assert any((step2[k] != step1[k]).any() for k in step1)  # training moved the adapters
    for k in step2:
        torch.testing.assert_close(step2_resumed[k], step2[k], rtol=0, atol=1e-6)

    out = run(
        [
            sys.executable,
            "ppo_openvla.py",
            "--eval-only",
            "--checkpoint",
            str(ckpts),
            "--run-dir",
            str(tmp_path),
            *TINY_RUN,
        ]
    )
    assert '"eval/success_rate"' in out and '"eval/success_at_end"' in out
    _, summary = check_evaluation(tmp_path / "ppo_openvla__s1", 2, 2)  # the checkpoint's step
    assert summary["checkpoint"].endswith("step_00000002") and summary["script"] == "ppo_openvla.py"


def test_critic_warmup_leaves_the_policy_as_it_was(tiny_openvla, tmp_path):
    """--critic-warmup-iterations 1: iteration 1 steps the value head only (LoRA B stays at its zero init and Adam
    holds no state for the adapters); iteration 2 trains both."""
    from common.checkpoint import load_trainer_state

    cmd = [sys.executable, "ppo_openvla.py", "--model-path", tiny_openvla, "--run-dir", str(tmp_path), *TINY_RUN]
    run(cmd + ["--total-iterations", "2", "--critic-warmup-iterations", "1", "--save-interval", "1"])
    ckpts = tmp_path / "ppo_openvla__s1" / "checkpoints"
    lora_b = [k for k in load_file(ckpts / "step_00000001" / "adapter_model.safetensors") if "lora_B" in k]
    assert lora_b
    for step, moved in (("step_00000001", False), ("step_00000002", True)):
        adapter = load_file(ckpts / step / "adapter_model.safetensors")
        assert any(adapter[k].abs().sum() > 0 for k in lora_b) == moved, step
    optimizer = load_trainer_state(str(ckpts / "step_00000001"))["optimizer"]
    adapter_ids, head_ids = (group["params"] for group in optimizer["param_groups"])
    assert set(optimizer["state"]) == set(head_ids) and not set(adapter_ids) & set(optimizer["state"])


def test_bad_flags_fail_before_any_work(tiny_openvla, tmp_path):
    import ppo_openvla

    for flags, message in [
        (dict(env_id="PushKube-v1"), "PushCube-v1"),
        (dict(unnorm_key="bridge_orig"), "maniskill"),
        (dict(num_envs=3, num_steps=3, num_minibatches=2), "--num-minibatches"),
        (dict(model_path=str(tmp_path / "missing")), "--model-path"),
        (dict(obj_set="test"), "--obj-set test applies to the PutOnPlateInScene25 tasks only"),
    ]:
        args = ppo_openvla.Args(**{"model_path": tiny_openvla, "run_dir": str(tmp_path), **flags})
        with pytest.raises((ValueError, FileNotFoundError, OSError), match=message):
            ppo_openvla.main(args)


def test_torchrun_two_ranks_stay_in_sync_full_finetuning(tiny_openvla, tmp_path):
    """2 ranks on gloo, every weight trainable: FSDP2 shards the model (--fsdp auto), the checkpoint is the gathered
    full model in the openvla layout."""
    from common.models.openvla import load_openvla

    cmd = [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "2",
        "ppo_openvla.py",
        "--model-path",
        tiny_openvla,
        "--run-dir",
        str(tmp_path),
        "--exp-name",
        "ddp",
        *TINY_RUN,
        "--num-envs",
        "1",
        "--micro-batch-size",
        "1",
        "--lora-rank",
        "0",
        "--total-iterations",
        "1",
        "--eval-interval",
        "0",
    ]
    out = run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "2 rank(s)" in out and "iter 1:" in out  # the script raises if the ranks' weights differ after the update
    step = tmp_path / "ddp__s1" / "checkpoints" / "step_00000001"
    assert (step / "value_head.safetensors").exists()
    trained, _ = load_openvla(str(step / "model"))  # the full model, saved in the openvla layout
    base, _ = load_openvla(tiny_openvla)
    assert not torch.equal(trained.projector.fc1.weight, base.projector.fc1.weight)
