"""What a user made is never lost, and bad input fails before any work: the three scripts' start-up checks, the
run-directory guard, SIGTERM with a checkpoint and resume, and skipped non-finite steps."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import tyro

import grpo_internvl
import ppo_openvla
import srpo_openvla_oft
from common.checkpoint import (
    CheckpointError,
    check_checkpoint_compatible,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    save_trainer_state,
    trainer_state,
    verify_safetensors_files,
)
from common.guards import NonFiniteGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_FLAGS = [  # (script, flags, text the error must contain)
    (ppo_openvla, dict(num_envs=0), "--num-envs"),
    (ppo_openvla, dict(num_steps=0), "--num-steps"),
    (ppo_openvla, dict(num_minibatches=0), "--num-minibatches"),
    (ppo_openvla, dict(micro_batch_size=0), "--micro-batch-size"),
    (ppo_openvla, dict(update_epochs=0), "--update-epochs"),
    (ppo_openvla, dict(total_iterations=-1), "--total-iterations"),
    (ppo_openvla, dict(max_episode_steps=0), "--max-episode-steps"),
    (ppo_openvla, dict(save_interval=-1), "--save-interval"),
    (ppo_openvla, dict(temperature=0.0), "--temperature"),
    (ppo_openvla, dict(fsdp="on"), "--fsdp on needs full fine-tuning"),
    (ppo_openvla, dict(num_initial_states=-1), "--num-initial-states"),
    (ppo_openvla, dict(critic_warmup_iterations=-1), "--critic-warmup-iterations"),
    (grpo_internvl, dict(num_envs=0), "--num-envs"),
    (grpo_internvl, dict(group_size=0), "--group-size"),
    (grpo_internvl, dict(micro_batch_size=0), "--micro-batch-size"),
    (grpo_internvl, dict(total_iterations=0), "--total-iterations"),
    (grpo_internvl, dict(temperature=-1.0), "--temperature"),
    (grpo_internvl, dict(num_initial_states=-1), "--num-initial-states"),
    (srpo_openvla_oft, dict(num_minibatches=0), "--num-minibatches"),
    (srpo_openvla_oft, dict(tasks_per_iteration=0), "--tasks-per-iteration"),
    (srpo_openvla_oft, dict(group_size=0), "--group-size"),
    (srpo_openvla_oft, dict(eval_init_states=0), "--eval-init-states"),
    (srpo_openvla_oft, dict(max_episode_steps=0), "--max-episode-steps"),
    (srpo_openvla_oft, dict(temperature=0.0), "--temperature"),
    (srpo_openvla_oft, dict(temperature=-1.0), "--temperature"),
]


@pytest.mark.parametrize(
    "script,flags,message",
    BAD_FLAGS,
    ids=[f"{s.__name__}-{next(iter(f))}={next(iter(f.values()))}" for s, f, _ in BAD_FLAGS],
)
def test_bad_flags_fail_before_any_work(script, flags, message):
    with pytest.raises(ValueError, match=message):
        script.main(script.Args(**flags))


def fake_checkpoint(run_path: str, script: str, args) -> None:
    def write(directory: str) -> None:
        save_trainer_state(directory, trainer_state(args, 6, None, script=script))

    save_checkpoint(os.path.join(run_path, "checkpoints"), 6, write)


def test_a_new_run_never_deletes_an_earlier_runs_checkpoints(tiny_openvla, tmp_path):
    args = ppo_openvla.Args(model_path=tiny_openvla, run_dir=str(tmp_path), exp_name="t")
    fake_checkpoint(str(tmp_path / "t__s1"), "ppo_openvla.py", args)
    with pytest.raises(CheckpointError, match="--resume .*--exp-name.*--overwrite"):
        ppo_openvla.main(ppo_openvla.Args(model_path=tiny_openvla, run_dir=str(tmp_path), exp_name="t"))
    assert os.path.isdir(tmp_path / "t__s1" / "checkpoints" / "step_00000006")


def test_resume_checks_script_and_lora_rank(tiny_openvla, tmp_path):
    args = ppo_openvla.Args(model_path=tiny_openvla, run_dir=str(tmp_path), exp_name="t", lora_rank=4)
    fake_checkpoint(str(tmp_path / "t__s1"), "ppo_openvla.py", args)
    ckpts = str(tmp_path / "t__s1" / "checkpoints")
    with pytest.raises(CheckpointError, match="--lora-rank 8 but .* --lora-rank 4"):
        ppo_openvla.main(
            ppo_openvla.Args(model_path=tiny_openvla, run_dir=str(tmp_path), exp_name="t", lora_rank=8, resume=ckpts)
        )
    with pytest.raises(CheckpointError, match="checkpoint of ppo_openvla.py, not grpo_internvl.py"):
        grpo_internvl.main(grpo_internvl.Args(run_dir=str(tmp_path), exp_name="t", resume=ckpts))


def test_resume_refuses_a_trainer_state_that_would_run_code(tiny_openvla, tmp_path):
    """--resume of a checkpoint someone else wrote, whose trainer_state.pt would create a file when unpickled."""
    args = ppo_openvla.Args(model_path=tiny_openvla, run_dir=str(tmp_path), exp_name="t")
    fake_checkpoint(str(tmp_path / "t__s1"), "ppo_openvla.py", args)
    ckpts = tmp_path / "t__s1" / "checkpoints"
    target = tmp_path / "created_by_the_checkpoint"
    payload = type("Payload", (), {"__reduce__": lambda self: (shutil.copyfile, (os.devnull, str(target)))})
    torch.save({"step": 6, "payload": payload()}, ckpts / "step_00000006" / "trainer_state.pt")
    os.remove(ckpts / "step_00000006" / "args.json")  # the settings check then reads the trainer state itself
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: refused"):
        ppo_openvla.main(
            ppo_openvla.Args(model_path=tiny_openvla, run_dir=str(tmp_path), exp_name="t", resume=str(ckpts))
        )
    assert not target.exists()


def test_corrupted_weights_name_the_file(tiny_openvla, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_openvla, model)
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated, as by a failed copy
    with pytest.raises(CheckpointError, match=shard.name):
        ppo_openvla.main(ppo_openvla.Args(model_path=str(model), run_dir=str(tmp_path)))


def test_sigterm_saves_a_checkpoint_to_resume_from(tiny_openvla, tmp_path):
    """SIGTERM (what Slurm and Kubernetes send) in the middle of a run: exit 0 with a complete checkpoint of the
    iteration that was running, one --resume accepts (resuming from a checkpoint replays exactly:
    tests/test_ppo_script.py)."""
    base = [
        sys.executable,
        "ppo_openvla.py",
        "--model-path",
        tiny_openvla,
        "--run-dir",
        str(tmp_path),
        "--exp-name",
        "t",
        "--env-id",
        "PushCube-v1",
        "--num-envs",
        "2",
        "--num-steps",
        "4",
        "--max-episode-steps",
        "4",
        "--num-minibatches",
        "1",
        "--micro-batch-size",
        "8",
        "--lora-rank",
        "4",
        "--image-size",
        "64",
        "--eval-interval",
        "0",
        "--save-interval",
        "0",
    ]
    proc = subprocess.Popen(
        base + ["--total-iterations", "1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 1:"):
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    ckpts = tmp_path / "t__s1" / "checkpoints"
    stopped_at = int((ckpts / "latest").read_text().strip().removeprefix("step_"))
    assert "stopped by SIGTERM" in output and stopped_at >= 1
    step_dir = resolve_checkpoint(str(ckpts))  # what --resume reads: `latest`, complete, its weights intact
    check_checkpoint_compatible(step_dir, "ppo_openvla.py", tyro.cli(ppo_openvla.Args, args=base[2:]))
    assert verify_safetensors_files(step_dir) >= 1 and load_trainer_state(step_dir)["step"] == stopped_at


def test_non_finite_loss_skips_the_step_and_stops_after_three():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    guard = NonFiniteGuard(max_in_a_row=3)
    for loss in (torch.tensor(float("nan")), torch.tensor(float("inf"))):
        (param.sum() * 0 + loss).backward()
        assert not guard.step(optimizer, loss, torch.nn.utils.clip_grad_norm_([param], 1.0))
    assert torch.equal(param.detach(), torch.ones(3)) and guard.skipped_steps == 2
    param.sum().backward()
    assert guard.step(optimizer, torch.tensor(1.0), torch.nn.utils.clip_grad_norm_([param], 1.0))
    for _ in range(2):
        guard.step(optimizer, torch.tensor(float("nan")), torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row"):
        guard.step(optimizer, torch.tensor(float("nan")), torch.tensor(1.0))


def test_diverged_weights_stop_with_a_clear_error_and_no_nan_checkpoint(tiny_openvla, tmp_path):
    """--learning-rate 1e6 used to write an all-NaN checkpoint and point `latest` at it."""
    cmd = [
        sys.executable,
        "ppo_openvla.py",
        "--model-path",
        tiny_openvla,
        "--run-dir",
        str(tmp_path),
        "--env-id",
        "PushCube-v1",
        "--num-envs",
        "2",
        "--num-steps",
        "4",
        "--max-episode-steps",
        "4",
        "--num-minibatches",
        "1",
        "--micro-batch-size",
        "8",
        "--lora-rank",
        "0",
        "--image-size",
        "64",
        "--eval-interval",
        "0",
        "--save-interval",
        "1",
        "--total-iterations",
        "4",
        "--learning-rate",
        "1e6",
        "--value-learning-rate",
        "1e6",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    ckpts = tmp_path / "ppo_openvla__s1" / "checkpoints"
    if out.returncode != 0:
        assert "FloatingPointError" in out.stderr and "--learning-rate" in out.stderr, out.stderr[-3000:]
    from safetensors.torch import load_file

    for step in ckpts.glob("step_*") if ckpts.exists() else []:
        for file in step.rglob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(file).values()), file


def test_another_models_checkpoint_is_refused_without_a_prompt(tiny_openvla, tmp_path):
    """An OpenVLA folder (custom remote code) given to the InternVL script: an error, never a [y/N] prompt."""
    with pytest.raises(ValueError, match="not a transformers-native checkpoint"):
        grpo_internvl.main(grpo_internvl.Args(model_path=tiny_openvla, run_dir=str(tmp_path)))
