"""OpenVLA-OFT parallel decoding: rollout log-probs == training log-probs, pipelined rollouts, bidirectional mask."""

import json
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from common.envs.libero import LiberoVectorEnv, configure_rendering, to_libero_actions
from common.models.openvla import ActionTokenizer, load_openvla
from common.models.tiny import make_tiny_openvla
from srpo_openvla_oft import (
    NUM_ACTION_TOKENS,
    Args,
    OFTPolicy,
    bin_logprobs,
    bins_to_actions,
    load_action_stats,
    rollout,
)

INSTRUCTIONS = [
    "put the black bowl on the plate",
    "turn on the stove",
    "open the top drawer and put the bowl inside of it carefully",
]


@pytest.fixture(scope="module")
def tiny_oft(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-oft"))
    make_tiny_openvla(path, seed=0)
    stats = {
        "libero_spatial_no_noops": {
            "action": {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}
        }
    }
    with open(os.path.join(path, "dataset_statistics.json"), "w") as f:
        json.dump(stats, f)
    vla, processor = load_openvla(path, device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    return path, OFTPolicy(vla, processor.tokenizer.eos_token_id).eval(), processor


class FakeEnvs:
    """The LiberoVectorEnv interface with random images; episodes end after a per-env number of steps."""

    def __init__(self, num_envs, max_steps, lengths):
        self.num_envs, self.max_steps, self.lengths = num_envs, max_steps, np.array(lengths)
        self.rng = np.random.default_rng(0)

    def reset(self, task_ids, init_ids, record_frames=True):
        self.t, self.sent = np.zeros(self.num_envs, int), {}
        return self._images(), [INSTRUCTIONS[t] for t in task_ids]

    def _images(self, n=None):
        return self.rng.integers(0, 255, size=(n or self.num_envs, 224, 224, 3), dtype=np.uint8)

    def step_send(self, env_ids, env_actions):
        env_ids = np.asarray(env_ids)
        executed = np.clip(self.lengths[env_ids] - self.t[env_ids], 0, env_actions.shape[1])
        self.t[env_ids] += executed
        done = self.t[env_ids] >= self.lengths[env_ids]
        self.sent[tuple(env_ids)] = self._images(len(env_ids)), np.zeros(len(env_ids), bool), done, executed

    def step_receive(self, env_ids):
        return self.sent.pop(tuple(env_ids))


def test_rollout_and_training_logprobs_agree(tiny_oft):
    path, policy, processor = tiny_oft
    stats = load_action_stats(path, policy.vla.config, "libero_spatial", None)
    tokenizer = ActionTokenizer(policy.vla.vocab_size)
    torch.manual_seed(0)
    envs = FakeEnvs(3, max_steps=24, lengths=[24, 11, 5])
    out, _ = rollout(
        policy,
        processor,
        lambda bins: to_libero_actions(bins_to_actions(bins, policy, tokenizer, stats)),
        envs,
        [(0, 0), (1, 0), (2, 0)],
        Args(temperature=1.6),
        nullcontext(),
    )
    mask = out.token_mask  # (Q, N, 56)
    assert mask.shape == (3, 3, NUM_ACTION_TOKENS)
    assert mask[:, 0].all() and mask[1, 1, :21].all() and not mask[1, 1, 21:].any() and not mask[2, 1].any()
    assert mask[0, 2, :35].all() and not mask[0, 2, 35:].any() and not mask[1:, 2].any()
    # Training: the valid queries, in another order and other batch compositions (other left padding)
    samples = [(q, n) for q in range(3) for n in range(3) if mask[q, n].any()][::-1]
    for batch in (samples[:1], samples[1:4], samples[4:]):
        ids, attn = processor.prompt_ids([out.instructions[n] for _, n in batch])
        images = torch.from_numpy(np.stack([out.images[q, n] for q, n in batch]))
        with torch.no_grad():
            logp_all = bin_logprobs(policy(ids, attn, processor.preprocess_images(images)), 1.6)
        bins = torch.stack([out.bins[q, n] for q, n in batch])
        new = logp_all.gather(-1, bins[..., None]).squeeze(-1)
        old = torch.stack([out.logprobs[q, n] for q, n in batch])
        m = torch.stack([mask[q, n] for q, n in batch])
        torch.testing.assert_close(new[m], old[m], atol=1e-5, rtol=0)


def test_pipeline_stages_give_the_same_greedy_episodes(tiny_oft):
    """Real LIBERO workers: the policy acting for one group of envs while the others simulate changes no episode."""
    path, policy, processor = tiny_oft
    stats = load_action_stats(path, policy.vla.config, "libero_spatial", None)
    tokenizer = ActionTokenizer(policy.vla.vocab_size)
    configure_rendering()
    envs = LiberoVectorEnv("libero_spatial", 3, camera_size=64, max_steps=24)
    try:
        outs = [
            rollout(
                policy,
                processor,
                lambda bins: to_libero_actions(bins_to_actions(bins, policy, tokenizer, stats)),
                envs,
                [(0, 0), (1, 3), (0, 5)],
                Args(pipeline_stages=stages, eval_temperature=0.0),
                nullcontext(),
                evaluation=True,
            )[0]
            for stages in (1, 2, 3)
        ]
    finally:
        envs.close()
    assert outs[0].token_mask.any()
    for out in outs[1:]:
        for name in ("images", "bins", "token_mask", "success", "length"):
            assert torch.equal(getattr(out, name), getattr(outs[0], name)), name
        torch.testing.assert_close(out.logprobs, outs[0].logprobs, atol=1e-5, rtol=0)


def test_attention_is_bidirectional_and_placeholders_are_empty(tiny_oft):
    _, policy, processor = tiny_oft
    ids, attn = processor.prompt_ids(INSTRUCTIONS[:1])
    pixels = processor.preprocess_images(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
    with torch.no_grad():
        base = policy(ids, attn, pixels)
        policy.stop_token_id = processor.tokenizer.bos_token_id  # a later token changes the first action row
        changed = policy(ids, attn, pixels)
        policy.stop_token_id = processor.tokenizer.eos_token_id
    assert base.shape == (1, NUM_ACTION_TOKENS, 256)
    assert not torch.allclose(base[:, 0], changed[:, 0])


def test_action_decoding_uses_oft_statistics(tiny_oft):
    path, policy, _ = tiny_oft
    stats = load_action_stats(path, policy.vla.config, "libero_spatial", None)
    assert stats["q99"][0] == 0.5  # dataset_statistics.json replaced the config's norm_stats
    bins = torch.full((1, NUM_ACTION_TOKENS), 255)  # bin 255 = the last action token = the lowest bin centre
    actions = bins_to_actions(bins, policy, ActionTokenizer(policy.vla.vocab_size), stats)
    assert actions.shape == (1, 8, 7)
    low = ActionTokenizer(policy.vla.vocab_size).bin_centers[0].item()
    np.testing.assert_allclose(actions[0, :, 0], 0.5 * (low + 1) * (1.0 + 1e-8) - 0.5)
    np.testing.assert_allclose(actions[0, :, 6], low)  # the gripper is not un-normalised
    with pytest.raises(ValueError, match="libero_spatial_no_noops"):
        load_action_stats(path, policy.vla.config, "libero_10", "libero_10_no_noops")


def test_every_lora_parameter_gets_a_gradient(tiny_oft):
    from common.models.openvla import make_trainable

    path, _, processor = tiny_oft
    vla, _ = load_openvla(path, device="cpu", dtype=torch.float32, attn_implementation="sdpa")
    make_trainable(vla, lora_rank=4, lora_alpha=8)
    policy = OFTPolicy(vla, processor.tokenizer.eos_token_id)
    ids, attn = processor.prompt_ids(INSTRUCTIONS[:2])
    pixels = processor.preprocess_images(torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8))
    bins = torch.randint(0, 256, (2, NUM_ACTION_TOKENS))
    logp = bin_logprobs(policy(ids, attn, pixels), 1.6).gather(-1, bins[..., None])
    logp.sum().backward()
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    assert all(p.grad is not None for p in trainable.values())


def test_gradient_checkpointing_acts_in_the_update(tiny_oft):
    """--gradient-checkpointing recomputes every decoder layer in update_policy's backward: transformers checkpoints
    only in train mode, and the policy rolls out (and is built) in eval mode."""
    import srpo_openvla_oft as srpo
    from common.guards import NonFiniteGuard
    from common.models.openvla import make_trainable

    path = tiny_oft[0]
    vla, processor = load_openvla(path, attn_implementation="sdpa")
    make_trainable(vla, 4, 16)
    vla.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for layer in vla.language_model.model.layers:
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=checkpoint, **k: calls.append(1) or _f(*a, **k)
    policy = OFTPolicy(vla, processor.tokenizer.eos_token_id).eval()
    Q, N = 1, 2
    batch = srpo.Rollout(
        images=torch.randint(0, 256, (Q, N, 224, 224, 3), dtype=torch.uint8),
        bins=torch.randint(0, 256, (Q, N, NUM_ACTION_TOKENS)),
        logprobs=torch.full((Q, N, NUM_ACTION_TOKENS), -5.5),
        token_mask=torch.ones((Q, N, NUM_ACTION_TOKENS), dtype=torch.bool),
        instructions=INSTRUCTIONS[:N],
        task=torch.zeros(N, dtype=torch.long),
        success=torch.zeros(N, dtype=torch.bool),
        length=torch.full((N,), 8),
    )
    samples = srpo.Samples(torch.zeros(N, dtype=torch.long), torch.arange(N), torch.tensor([1.0, -1.0]))
    args = Args(model_path=path, suite="libero_spatial", num_envs=N, micro_batch_size=N)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    metrics = srpo.update_policy(policy, optimizer, processor, batch, samples, args, nullcontext(), NonFiniteGuard())
    assert metrics["actor/grad_norm"] > 0
    assert len(calls) == len(vla.language_model.model.layers)
