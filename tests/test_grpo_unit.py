"""grpo_internvl.py without a simulator: constrained decoding, log-prob consistency, GRPO maths, bad input."""

import contextlib
import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerFast, Qwen2Config

import grpo_internvl as grpo
from common.guards import NonFiniteGuard
from common.models.action_text import parse_action_text
from common.models.tiny import make_tiny_internvl

INSTRUCTION = "push the cube to the goal region"


@pytest.fixture(scope="module", params=["grouped", "single"])
def tiny(request, tmp_path_factory):
    """(processor, template, model) for a tiny InternVL whose tokenizer has single-token integers or split digits."""
    path = make_tiny_internvl(str(tmp_path_factory.mktemp(f"internvl_{request.param}")), digits=request.param)
    processor, template = grpo.load_processor_and_template(path)
    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return processor, template, model


def make_inputs(processor, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8, generator=g)
    tcp_pose = torch.randn(batch, 7, generator=g) * torch.tensor([0.3] * 3 + [1.0] * 4)
    tcp_pose[:, 3:] /= tcp_pose[:, 3:].norm(dim=1, keepdim=True)
    return rgb, tcp_pose


def test_template_layout(tiny):
    processor, template, _ = tiny
    assert template.digits_per_number == (1 if len(processor.tokenizer) > 1000 else 3)
    assert template.num_free == 6 * (1 + template.digits_per_number) + 1
    answer = template.assemble(torch.zeros(1, template.num_free, dtype=torch.long))
    assert answer.shape == (1, template.answer_len)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.0, 0, 1.0), (0.3, 0, 1.0), (1.0, 0, 1.0), (1.6, 20, 0.7), (5.0, 0, 0.9)]
)
def test_every_sampled_answer_parses(tiny, temperature, top_k, top_p):
    """Property: any sample is a well-formed template, canonically tokenized, decoding to the same action."""
    processor, template, model = tiny
    torch.manual_seed(int(temperature * 10) + top_k)
    rgb, tcp_pose = make_inputs(processor, 32)
    inputs = grpo.build_inputs(processor, [INSTRUCTION] * 32, rgb, tcp_pose, "cpu")
    distinct = set()
    for _ in range(2):
        choices, tokens, logp, _, entropy = grpo.generate_actions(model, inputs, template, temperature, top_k, top_p)
        answers = template.assemble(tokens)
        actions = template.to_env_action(choices)  # (B, 7)
        assert actions.abs().max() <= 1.0 and set(actions[:, 6].tolist()) <= {-1.0, 1.0}
        for answer, action in zip(answers, actions):
            text = processor.tokenizer.decode(answer)
            assert torch.allclose(parse_action_text(text), action), text
            assert processor.tokenizer.encode(text, add_special_tokens=False) == answer.tolist(), text
            distinct.add(text)
        if temperature > 0:
            assert torch.isfinite(logp).all() and (logp <= 0).all() and (entropy >= 0).all()
    assert len(distinct) > (1 if temperature == 0 else 40)  # greedy differs per image/state; sampling varies


def test_action_decoding_units():
    """mm -> m and degrees -> rad, clipped to the 0.1 m / 0.1 rad controller range, normalised to [-1, 1]."""
    text = "action: {x: -18mm, y: 500mm, z: 0mm, roll: 3 degrees, pitch: -90 degrees, yaw: 0 degrees, open: 0}"
    action = parse_action_text(text)
    expected = torch.tensor([-0.18, 1.0, 0.0, 3 / 57.3 / 0.1, -1.0, 0.0, -1.0])
    assert torch.allclose(action, expected, atol=1e-6)
    with pytest.raises(ValueError):
        parse_action_text(text.replace("open: 0", "open: 2"))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.6, 20, 0.7), (0.7, 0, 0.8), (1.3, 5, 1.0)])
def test_rollout_logprob_equals_training_logprob(tiny, temperature, top_k, top_p):
    """KV-cached rollout log-probs == one teacher-forced forward, with a different batch (other padding)."""
    processor, template, model = tiny
    torch.manual_seed(0)
    rgb, tcp_pose = make_inputs(processor, 8, seed=1)
    inputs = grpo.build_inputs(processor, [INSTRUCTION] * 8, rgb, tcp_pose, "cpu")
    choices, tokens, old_logp, support, _ = grpo.generate_actions(model, inputs, template, temperature, top_k, top_p)
    assert (support.sum(-1) < template.set_valid[template.free_set].sum(-1)).any(), "top-k/top-p must be active"

    order = torch.tensor([5, 2, 7])  # a sub-batch in another order: other padding, other positions
    inputs = grpo.build_inputs(processor, [INSTRUCTION] * 3, rgb[order], tcp_pose[order], "cpu")
    logits = grpo.free_slot_logits(model, inputs, template.assemble(tokens[order]), template)
    logp = grpo.policy_logprobs(logits, support[order], temperature).gather(2, choices[order, :, None]).squeeze(2)
    assert torch.allclose(logp, old_logp[order], atol=1e-5, rtol=0)
    # The test is sensitive: ignoring top-k/top-p (the anchor's bug) gives other log-probs.
    valid = template.set_valid[template.free_set].expand_as(support[order])
    unfiltered = grpo.policy_logprobs(logits, valid, temperature).gather(2, choices[order, :, None]).squeeze(2)
    assert (unfiltered - old_logp[order]).abs().max() > 1e-3


def test_group_advantages_hand_worked():
    rewards = torch.tensor([5.0, 5, 5, 5, 0, 0, 0, 0, 5, 0, 0, 0])  # all-success, all-fail, mixed
    adv = grpo.group_advantages(rewards, 4)
    assert torch.equal(adv[:8], torch.zeros(8))  # exact zeros: no signal from an all-equal group
    # mixed: mean 1.25, unbiased std sqrt((3.75^2 + 3 * 1.25^2) / 3) = 2.5
    assert torch.allclose(adv[8:], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)
    # a non-integer reward coefficient in float32 used to give |A| up to 0.12 for an all-equal group
    assert torch.equal(grpo.group_advantages(torch.full((8,), 0.7 * 5.0), 8), torch.zeros(8))
    success = rewards > 0
    assert grpo.keep_groups(success, 4, (0.1, 0.9)).tolist() == [False] * 8 + [True] * 4
    assert grpo.keep_groups(torch.tensor([1, 0, 1, 1, 1, 1, 1, 1, 1, 1]).bool(), 10, (0.1, 0.9)).all()  # 0.9 kept
    assert not grpo.keep_groups(torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).bool(), 10, (0.1, 0.9)).any()


def test_episode_weights_hand_worked():
    length, kept = torch.tensor([10, 30, 20, 40]), torch.tensor([True, True, True, False])
    assert torch.equal(grpo.episode_weights(length, kept, "token-mean"), torch.ones(4))
    weights = grpo.episode_weights(length, kept, "seq-mean-token-mean")  # mean kept length 20
    assert torch.allclose(weights, torch.tensor([2.0, 2 / 3, 1.0, 0.5]))
    assert torch.allclose(weights[:3] * length[:3], torch.full((3,), 20.0))  # every kept episode weighs the same
    # with weights as the token mask, the token-mean over the kept tokens is the mean over episodes of their token-mean
    per_token = torch.randn(60)
    episode = torch.repeat_interleave(torch.arange(3), length[:3])
    token_mean = (per_token * weights[episode]).sum() / 60
    seq_mean = torch.stack([per_token[episode == i].mean() for i in range(3)]).mean()
    assert torch.allclose(token_mean, seq_mean)


def test_clipped_token_loss_hand_worked():
    old_logp = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]])).requires_grad_()
    advantages = torch.tensor([1.5, -0.5])
    mask = torch.ones(2, 3)
    loss, _, clipfrac = grpo.clipped_token_loss(logp, old_logp, advantages, mask, 0.2, 0.28, num_tokens=6.0)
    # A > 0: max(-A r, -A clip(r, 0.8, 1.28)); A < 0 likewise (the asymmetric clip bounds the ratio at 1.28 / 0.8)
    expected = torch.tensor([[-1.5, -1.5 * 1.28, -0.75], [0.5, 0.75, 0.5 * 0.8]])
    assert torch.allclose(loss, expected.mean())
    assert torch.allclose(clipfrac, torch.tensor(4 / 6))
    loss.backward()
    # gradient flows only where the unclipped term is the max
    assert (logp.grad[0, 1] == 0) and (logp.grad[0, 2] != 0) and (logp.grad[1, 1] != 0) and (logp.grad[1, 2] == 0)

    ref_logp = old_logp + math.log(0.5)
    kl = grpo.kl_to_reference(old_logp, ref_logp, mask, num_tokens=6.0)
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(pi_ref / pi) = log 0.5
    assert torch.allclose(kl, torch.tensor(k3))


def rollout_batch(policy, processor, template, temperature, T=2, N=4):
    """A hand-made rollout batch (T steps x N envs) as `rollout` returns it, without a simulator."""
    rgb, tcp_pose = make_inputs(processor, N * T, seed=3)
    inputs = grpo.build_inputs(processor, [INSTRUCTION] * (N * T), rgb, tcp_pose, "cpu")
    sampled = grpo.generate_actions(policy, inputs, template, temperature, 0, 1.0)
    return grpo.Rollout(
        instructions=[INSTRUCTION] * N,
        rgb=rgb.view(T, N, *rgb.shape[1:]),
        tcp_pose=tcp_pose.view(T, N, 7),
        choices=sampled.choices.view(T, N, -1),
        tokens=sampled.tokens.view(T, N, -1),
        logprobs=sampled.logp.view(T, N, -1),
        entropy=sampled.entropy.view(T, N, -1),
        support=sampled.support.view(T, N, *sampled.support.shape[1:]),
        alive=torch.ones(T, N, dtype=torch.bool),
        success=torch.zeros(N, dtype=torch.bool),
        length=torch.full((N,), T),
        frames=[],
        tokens_generated=0,
    )


def run_update(policy, reference, processor, template, batch, success, args):
    """One update_policy call with GRPO advantages for `success` (N,); returns (summed |weight change|, metrics)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=args.learning_rate)
    T, N = batch.logprobs.shape[:2]
    advantages = grpo.group_advantages(args.reward_coef * success.float(), args.group_size)
    kept = grpo.keep_groups(success, args.group_size, args.success_bounds)
    step_idx, env_idx = (torch.ones(T, N, dtype=torch.bool) & kept[None]).nonzero(as_tuple=True)
    weights = grpo.episode_weights(torch.full((N,), T), kept, args.loss_agg_mode)
    samples = grpo.Samples(step_idx, env_idx, advantages, weights)
    metrics = grpo.update_policy(
        policy,
        optimizer,
        processor,
        template,
        batch,
        samples,
        args,
        contextlib.nullcontext(),
        NonFiniteGuard(),
        reference,
    )
    change = sum((p.detach() - b).abs().sum().item() for p, b in zip(params, before))
    return change, metrics


def test_filtered_groups_contribute_nothing(tiny):
    """LoRA update on a hand-made batch: groups outside [0.1, 0.9] leave the weights untouched, a mixed one moves
    them."""
    processor, template, model = tiny
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(copy.deepcopy(model), lora)
    args = grpo.Args(group_size=2, num_minibatches=1, micro_batch_size=3, learning_rate=1e-2, kl_coef=0.1)
    ep = rollout_batch(policy, processor, template, args.temperature)

    change, metrics = run_update(policy, None, processor, template, ep, torch.tensor([True, True, False, False]), args)
    assert change == 0 and metrics == {}  # an all-success and an all-fail group: nothing to learn
    change, metrics = run_update(policy, None, processor, template, ep, torch.tensor([True, False, False, False]), args)
    assert change > 0 and abs(metrics["actor/approx_kl"]) < 1e-6 and metrics["actor/clipfrac"] == 0
    assert metrics["actor/kl"] > 0  # reference = the base with the (random) adapters switched off


def test_full_finetuning_with_reference_and_checkpointing(tiny):
    """--lora-rank 0 with a frozen reference copy and gradient checkpointing: KL starts at 0 and grows."""
    processor, template, model = tiny
    policy = copy.deepcopy(model)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    args = grpo.Args(
        group_size=2,
        lora_rank=0,
        kl_coef=0.1,
        update_epochs=2,
        num_minibatches=2,
        micro_batch_size=4,
        learning_rate=0.5,
    )
    ep = rollout_batch(policy, processor, template, args.temperature)
    change, metrics = run_update(
        policy, reference, processor, template, ep, torch.tensor([True, False, False, True]), args
    )
    assert change > 0 and 0 < metrics["actor/kl"] < 1 and metrics["actor/approx_kl"] > 0


def test_bad_input_fails_before_expensive_work(tmp_path):
    with pytest.raises(ValueError, match="--group-size"):
        grpo.main(grpo.Args(group_size=1))
    with pytest.raises(ValueError, match="--num-envs .* --group-size"):
        grpo.main(grpo.Args(num_envs=6, group_size=4))
    with pytest.raises(ValueError, match="--env-id"):
        grpo.main(grpo.Args(env_id="NoSuchTask-v9"))
    Qwen2Config(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        tmp_path / "qwen"
    )
    with pytest.raises(ValueError, match="--model-path .*not 'internvl'"):
        grpo.main(grpo.Args(model_path=str(tmp_path / "qwen")))
    with pytest.raises(FileNotFoundError, match="--resume"):
        grpo.main(grpo.Args(resume=str(tmp_path / "nothing")))


def test_tokenizer_that_cannot_express_the_template():
    """A byte-level BPE without merges splits " -" into two tokens: a clear error naming the flag."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(ValueError, match="--model-path: the tokenizer cannot express the action template"):
        grpo.ActionTemplate(PreTrainedTokenizerFast(tokenizer_object=raw))
