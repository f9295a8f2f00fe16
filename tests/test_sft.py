"""sft_internvl.py and sft_openvla.py: target round trips through the RL scripts' decoding, memorisation of a fixed
batch, and each script end to end as a subprocess (real ManiSkill evaluation), its final model loaded by the RL
script's loader with the same outputs as the trained adapter."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_checks import check_evaluation

from common.envs.demos import action_norm_stats, save_episode
from common.models.action_text import ActionTemplate, build_inputs, load_processor_and_template, parse_action_text
from common.models.openvla import ActionTokenizer, action_stats, load_lora_adapter, load_openvla, make_trainable
from common.models.tiny import build_tokenizer, make_tiny_internvl

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "push the cube to the goal region"


def fake_actions(rng: np.random.Generator, steps: int) -> np.ndarray:
    """pd_ee_delta_pose actions in [-1, 1] as the experts write them: gripper exactly -1 or +1."""
    actions = rng.uniform(-1, 1, size=(steps, 7)).astype(np.float32)
    actions[:, 6] = rng.choice([-1.0, 1.0], size=steps)
    return actions


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    """A demo folder in collect_demos.py's format: 3 episodes x 4 steps, random 64 x 64 images."""
    path = tmp_path_factory.mktemp("demos")
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(3):
        episode = dict(
            rgb=rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8),
            tcp_pose=np.tile(np.array([0.0, 0.0, 0.1, 0.0, 1.0, 0.0, 0.0], np.float32), (4, 1)),
            action=fake_actions(rng, 4),
            instruction=INSTRUCTION,
            success=True,
            seed=i,
        )
        save_episode(str(path / f"episode_{i:06d}.npz"), episode)
        episodes.append(episode)
    meta = dict(
        env_id="PushCube-v1",
        control_mode="pd_ee_delta_pose",
        instruction=INSTRUCTION,
        image_size=64,
        max_episode_steps=50,
        first_seed=0,
        episodes_tried=3,
        num_episodes=3,
        keep_failed=False,
        expert_success_rate=1.0,
        action_norm_stats=action_norm_stats(episodes),
    )
    (path / "meta.json").write_text(json.dumps(meta))
    return str(path)


@pytest.fixture(scope="module")
def tiny_internvl(tmp_path_factory) -> str:
    return make_tiny_internvl(str(tmp_path_factory.mktemp("internvl")))


def run(script: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def scalar_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])


# ---------------------------------------------------------------------------------------------------------------
# Targets: demo action -> target tokens -> the RL script's decoding gives the action back within the quantisation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("digits", ["grouped", "single"])
def test_internvl_targets_decode_to_the_demo_action(digits):
    tokenizer = build_tokenizer(digits)
    template = ActionTemplate(tokenizer)
    actions = torch.from_numpy(fake_actions(np.random.default_rng(1), 64))
    actions[:4, :6] = torch.tensor([[0.0] * 6, [1.0] * 6, [-1.0] * 6, [0.004, -0.004, 0.006, 0.05, -0.05, 0.1]])
    choices = template.choices_from_action(actions)
    answer_ids = template.answer_ids(choices)
    # the free tokens of the target sit where grpo_internvl.py's decoder samples them, from the slots' allowed sets
    slot_ids = template.set_ids[template.free_set]  # (F, S)
    assert torch.equal(answer_ids[:, template.free_pos], slot_ids[torch.arange(template.num_free), choices])
    decoded = template.to_env_action(choices)
    pos_quantum, rot_quantum = 1 / 1000 / 0.1, 1 / 57.3 / 0.1  # 1 mm and 1 degree in normalised units
    assert (decoded[:, :3] - actions[:, :3]).abs().max() <= pos_quantum / 2 + 1e-6
    assert (decoded[:, 3:6] - actions[:, 3:6]).abs().max() <= rot_quantum / 2 + 1e-6
    assert torch.equal(decoded[:, 6], actions[:, 6])
    for row in range(8):  # the text itself parses to the same action
        torch.testing.assert_close(parse_action_text(tokenizer.decode(answer_ids[row])), decoded[row])


def test_openvla_targets_decode_to_the_demo_action():
    from ppo_openvla import to_env_action
    from sft_openvla import env_to_model_actions

    actions = torch.from_numpy(fake_actions(np.random.default_rng(2), 256))
    actions[0, :6], actions[1, :6] = 1.0, -1.0  # beyond q99 / q01: clipped
    model_actions = env_to_model_actions(actions)
    assert set(model_actions[:, 6].tolist()) == {0.0, 1.0}  # OpenVLA's gripper: 0 close, 1 open
    stats = action_norm_stats([{"action": model_actions.numpy()}])["action"]
    action_tokenizer = ActionTokenizer(vocab_size=1000)
    tokens = action_tokenizer.normalized_to_tokens(ActionTokenizer.normalize(model_actions, stats))
    assert ((tokens >= action_tokenizer.first_token) & (tokens < 1000)).all()
    decoded = to_env_action(tokens, action_tokenizer, stats)  # what PPO sends to the env
    q01, q99 = torch.tensor(stats["q01"][:6]), torch.tensor(stats["q99"][:6])
    one_bin = (q99 - q01) / 255
    error = (decoded[:, :6] - torch.maximum(torch.minimum(actions[:, :6], q99), q01)).abs()
    assert (error <= one_bin + 1e-6).all(), (error / one_bin).max()
    assert torch.equal(decoded[:, 6], actions[:, 6])  # the gripper comes back exactly, -1 / +1


# ---------------------------------------------------------------------------------------------------------------
# Memorisation: a few steps on 4 fixed samples drive the answer-token loss down
# ---------------------------------------------------------------------------------------------------------------
def test_internvl_memorises_a_fixed_batch(demo_dir, tiny_internvl):
    from grpo_internvl import load_policy
    from sft_internvl import answer_loss, load_samples

    processor, template = load_processor_and_template(tiny_internvl)
    data = load_samples((demo_dir,), template)
    torch.manual_seed(0)
    settings = SimpleNamespace(
        model_path=tiny_internvl, lora_rank=0, lora_alpha=0, gradient_checkpointing=False, bf16=False
    )
    policy = load_policy(settings, torch.device("cpu"), None)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)
    idx = torch.arange(4)
    inputs = build_inputs(processor, [INSTRUCTION] * 4, data["rgb"][idx], data["tcp_pose"][idx], "cpu")
    losses, free_correct = [], []
    for _ in range(12):
        loss, stats = answer_loss(policy, inputs, data["choices"][idx], template, 4 * template.answer_len)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        free_correct.append(stats["free_correct"])
    assert losses[-1] < 0.7 * losses[0], losses
    assert free_correct[-1] > free_correct[0], free_correct


def test_openvla_memorises_a_fixed_batch(demo_dir, tiny_openvla):
    from sft_openvla import action_loss, load_samples

    vla, processor = load_openvla(tiny_openvla)
    make_trainable(vla, 0, 0)
    action_tokenizer = ActionTokenizer(vla.vocab_size, vla.n_action_bins)
    data, _ = load_samples((demo_dir,), action_tokenizer)
    optimizer = torch.optim.AdamW([p for p in vla.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    prompt_ids, prompt_mask = processor.prompt_ids([INSTRUCTION] * 4)
    pixel_values = processor.preprocess_images(data["rgb"][:4])
    losses = []
    for _ in range(12):
        loss, stats = action_loss(vla, pixel_values, prompt_ids, prompt_mask, data["tokens"][:4], action_tokenizer)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert stats["free_correct"] > 0


# ---------------------------------------------------------------------------------------------------------------
# The scripts end to end; their final models in the RL scripts' loaders
# ---------------------------------------------------------------------------------------------------------------
TINY_SFT = [
    "--batch-size",
    "4",
    "--micro-batch-size",
    "2",
    "--num-envs",
    "1",
    "--max-episode-steps",
    "2",
    "--lora-rank",
    "4",
    "--learning-rate",
    "1e-2",
    "--save-interval",
    "2",
    "--seed",
    "3",
]


def test_sft_internvl_train_eval_resume_final_model(demo_dir, tiny_internvl, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration

    from grpo_internvl import free_slot_logits, load_policy

    common = ["--demos", demo_dir, "--model-path", tiny_internvl, *TINY_SFT, "--total-iterations", "4"]
    out = run("sft_internvl.py", *common, "--run-dir", str(tmp_path / "a"), "--eval-interval", "4", "--capture-video")
    assert "12 demo steps" in out and "iter 4:" in out and " eval " in out
    run_path = tmp_path / "a" / "sft_internvl__s3"
    ckpts = run_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    expected = {
        "actor/loss",
        "actor/token_accuracy",
        "actor/free_slot_accuracy",
        "actor/action_accuracy",
        "actor/grad_norm",
        "actor/lr",
        "actor/epoch",
        "eval/success_rate",
        "time/update_samples_per_s",
    }
    assert expected <= scalar_tags(run_path)
    assert list((run_path / "videos").glob("*.mp4"))
    records, _ = check_evaluation(run_path, 4, 1, fields=("seed", "video"))
    assert (run_path / records[0]["video"]).exists()

    # Resuming from step 2 (no simulator) replays steps 3 and 4 exactly.
    run(
        "sft_internvl.py",
        *common,
        "--run-dir",
        str(tmp_path / "b"),
        "--num-envs",
        "0",
        "--resume",
        str(ckpts / "step_00000002"),
    )
    trained = load_file(ckpts / "step_00000004" / "adapter_model.safetensors")
    resumed = load_file(
        tmp_path / "b" / "sft_internvl__s3" / "checkpoints" / "step_00000004" / "adapter_model.safetensors"
    )
    for key in trained:
        torch.testing.assert_close(resumed[key], trained[key], rtol=0, atol=1e-6)

    # final/ is a plain InternVL checkpoint: grpo_internvl.py loads it (fresh LoRA on top) and it computes what the
    # base model + the trained adapter computes.
    final = str(run_path / "final")
    processor, template = load_processor_and_template(final)
    settings = SimpleNamespace(model_path=final, lora_rank=8, lora_alpha=16, gradient_checkpointing=False, bf16=False)
    grpo_policy = load_policy(settings, torch.device("cpu"), None).eval()
    adapter = PeftModel.from_pretrained(
        InternVLForConditionalGeneration.from_pretrained(tiny_internvl), str(ckpts / "step_00000004")
    ).eval()
    rng = np.random.default_rng(5)
    inputs = build_inputs(
        processor,
        [INSTRUCTION] * 2,
        torch.from_numpy(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)),
        torch.tensor([[0.0, 0.0, 0.1, 0.0, 1.0, 0.0, 0.0]] * 2),
        "cpu",
    )
    answer_ids = template.answer_ids(template.choices_from_action(torch.from_numpy(fake_actions(rng, 2))))
    with torch.no_grad():
        torch.testing.assert_close(
            free_slot_logits(grpo_policy, inputs, answer_ids, template),
            free_slot_logits(adapter, inputs, answer_ids, template),
            rtol=1e-4,
            atol=1e-4,
        )


def test_sft_openvla_train_eval_final_model(demo_dir, tiny_openvla, tmp_path):
    from sft_openvla import action_loss, load_samples

    out = run(
        "sft_openvla.py",
        "--demos",
        demo_dir,
        "--model-path",
        tiny_openvla,
        *TINY_SFT,
        "--total-iterations",
        "3",
        "--eval-interval",
        "3",
        "--run-dir",
        str(tmp_path),
    )
    assert "iter 3:" in out and "eval" in out and "maniskill_pushcube-v1" in out
    run_path = tmp_path / "sft_openvla__s3"
    expected = {"actor/loss", "actor/free_slot_accuracy", "actor/action_l1", "eval/success_rate", "actor/epoch"}
    assert expected <= scalar_tags(run_path)
    check_evaluation(run_path, 3, 1, fields=("seed",))

    # final/ is in the openvla-7b layout with the demos' stats under the new key, next to the base model's keys;
    # ppo_openvla.py's loaders read it, and it computes what the base model + the trained adapter computes.
    final, _ = load_openvla(str(run_path / "final"))
    base, processor = load_openvla(tiny_openvla)
    action_tokenizer = ActionTokenizer(base.vocab_size, base.n_action_bins)
    data, norm_stats = load_samples((demo_dir,), action_tokenizer)
    assert set(final.config["norm_stats"]) == {"maniskill", "maniskill_pushcube-v1"}
    assert action_stats(final.config, "maniskill_pushcube-v1") == norm_stats["action"]
    assert not any("lora_" in name for name in final.state_dict())
    make_trainable(base, 4, 16)
    load_lora_adapter(base, str(run_path / "checkpoints" / "step_00000003"))
    prompt_ids, prompt_mask = processor.prompt_ids([INSTRUCTION] * 2)
    pixel_values = processor.preprocess_images(data["rgb"][:2])
    with torch.no_grad():
        merged_loss, _ = action_loss(
            final.eval(), pixel_values, prompt_ids, prompt_mask, data["tokens"][:2], action_tokenizer
        )
        adapter_loss, _ = action_loss(
            base.eval(), pixel_values, prompt_ids, prompt_mask, data["tokens"][:2], action_tokenizer
        )
    torch.testing.assert_close(merged_loss, adapter_loss, rtol=1e-4, atol=1e-4)
    assert os.path.isfile(run_path / "final" / "preprocessor_config.json")


def test_bad_flags_fail_in_validate(demo_dir, tiny_internvl, tiny_openvla, tmp_path):
    """validate() runs before any weights or envs load; each bad flag is named in the error."""
    import sft_internvl
    import sft_openvla

    for script, model, demos, extra, message in [
        (sft_internvl, tiny_internvl, demo_dir, dict(batch_size=6, micro_batch_size=4), "--micro-batch-size"),
        (sft_internvl, tiny_internvl, str(tmp_path), {}, "meta.json"),
        (sft_openvla, tiny_internvl, demo_dir, {}, "not an OpenVLA checkpoint"),
        (sft_openvla, tiny_openvla, demo_dir, dict(eval_only=True, num_envs=0), "--num-envs"),
    ]:
        args = script.Args(demos=(demos,), model_path=model, run_dir=str(tmp_path), num_envs=0)
        for key, value in extra.items():
            setattr(args, key, value)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            script.validate(args, 1)


def test_num_epochs_sets_the_iterations(demo_dir, tiny_internvl):
    import sft_internvl

    args = sft_internvl.Args(
        demos=(demo_dir,), model_path=tiny_internvl, num_envs=0, batch_size=4, micro_batch_size=4, num_epochs=2.5
    )
    sft_internvl.validate(args, world_size=2)
    assert (args.num_samples, args.global_batch_size, args.total_iterations) == (12, 8, 4)  # ceil(2.5 * 12 / 8)
    assert args.env_id == "PushCube-v1" and args.image_size == 64
    epochs = [sft_internvl.batch_indices(it, args, rank) for it in (1, 2, 3) for rank in (0, 1)]
    first_epoch = torch.cat(epochs)[:12]
    assert sorted(first_epoch.tolist()) == list(range(12))  # ranks take disjoint slices; an epoch covers every sample
