"""PPO pieces of ppo_openvla.py: GAE, clipped losses, constrained decoding, rollout/training log-prob agreement."""

import math

import pytest
import torch

from common.models.openvla import ActionTokenizer, load_openvla, make_trainable
from ppo_openvla import ActorCritic, GraspShapedReward, bootstrap_mask, compute_gae, ppo_losses


def test_gae_hand_worked_with_termination_and_truncation():
    gamma = lam = 0.5
    # env 0: terminates at t=1. env 1: truncated at t=1, so the script folded gamma * V(final obs) = 0.5 * 4 into r_1.
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0 + 0.5 * 4.0], [3.0, 3.0]])
    values = torch.tensor([[0.5, 0.5], [1.0, 1.0], [1.5, 1.5]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    next_value = torch.tensor([2.0, 2.0])
    adv, ret = compute_gae(rewards, values, dones, next_value, gamma, lam)
    # t=2: 3 + .5*2 - 1.5 = 2.5 | t=1: 2 - 1 = 1 (env 1: 4 - 1 = 3) | t=0: 1 + .5*1 - .5 = 1, + .25 * A_1
    torch.testing.assert_close(adv, torch.tensor([[1.25, 1.75], [1.0, 3.0], [2.5, 2.5]]))
    torch.testing.assert_close(ret, adv + values)


@pytest.mark.parametrize(
    "reward_mode, bootstrap_truncated, expected",
    [
        ("sparse", True, [False, True, False, False]),  # truncations only; success at the limit is a success
        ("sparse", False, [False, False, False, False]),  # the step limit is the horizon
        ("dense", True, [True, True, False, True]),  # every finished episode, as ManiSkill's PPO
        ("dense", False, [True, False, False, True]),  # successes only
    ],
)
def test_bootstrap_mask(reward_mode, bootstrap_truncated, expected):
    # env 0 succeeds, env 1 hits the time limit, env 2 goes on, env 3 succeeds at the time limit
    terminated = torch.tensor([True, False, False, True])
    truncated = torch.tensor([False, True, False, True])
    mask = bootstrap_mask(terminated, truncated, reward_mode, bootstrap_truncated)
    assert mask.tolist() == expected


def test_ppo_losses_hand_worked():
    new_logprob = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    pg, v, kl, clipfrac = ppo_losses(
        new_logprob,
        torch.zeros(3),
        torch.tensor([1.0, -1.0, 2.0]),
        new_value=torch.tensor([0.0, 5.0, 30.0]),
        old_value=torch.tensor([0.0, 4.5, 0.0]),
        returns=torch.tensor([1.0, 5.0, 0.0]),
        clip_coef=0.2,
        value_clip=0.2,
        huber_delta=10.0,
    )
    assert pg.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3)  # clipped at 1.2 for A>0, at 0.8 for A<0
    assert v.item() == pytest.approx((0.5 + 0.045 + 250.0) / 3)  # max(unclipped, clipped) Huber, linear beyond 10
    assert kl.item() == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def agent_and_inputs(tiny_openvla):
    torch.manual_seed(0)
    vla, processor = load_openvla(tiny_openvla)
    make_trainable(vla, lora_rank=4, lora_alpha=8)
    with torch.no_grad():  # make the adapters non-zero so they take part in both passes
        for name, p in vla.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    agent = ActorCritic(vla, ActionTokenizer(vla.vocab_size)).eval()
    ids, mask = processor.prompt_ids(
        ["push the cube to the goal region", "pick up the cube", "stack the red cube on top of the green cube"]
    )
    pixels = processor.preprocess_images(torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8))
    return agent, pixels, ids, mask


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 2.0])
def test_decoding_only_emits_action_tokens(agent_and_inputs, temperature):
    agent, pixels, ids, mask = agent_and_inputs
    for _ in range(3):
        tokens, logprob, value = agent.act(pixels, ids, mask, temperature)
        assert tokens.shape == (3, 7) and value.shape == (3,)
        assert ((tokens >= agent.first_action_token) & (tokens < agent.first_action_token + 256)).all()
        assert (logprob <= 0).all()


def test_greedy_decoding_is_the_masked_argmax(agent_and_inputs):
    agent, pixels, ids, mask = agent_and_inputs
    tokens, _, _ = agent.act(pixels, ids, mask, 0.0)
    with torch.no_grad():
        logits = agent.vla(ids[:1], mask[:1], pixels[:1]).logits[0, -1]
    masked = torch.full_like(logits, -math.inf)
    masked[agent.first_action_token : agent.first_action_token + 256] = logits[
        agent.first_action_token : agent.first_action_token + 256
    ]
    assert tokens[0, 0].item() == masked.argmax().item()


@pytest.mark.parametrize("temperature", [1.0, 1.6])
def test_rollout_logprob_equals_training_logprob(agent_and_inputs, temperature):
    agent, pixels, ids, mask = agent_and_inputs
    torch.manual_seed(1)
    tokens, rollout_logprob, rollout_value = agent.act(pixels, ids, mask, temperature)
    with torch.no_grad():
        train_logprob, entropy, train_value = agent(pixels, ids, mask, tokens, temperature)
    torch.testing.assert_close(train_logprob, rollout_logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(train_value, rollout_value, rtol=0, atol=1e-5)
    assert (entropy > 0).all() and (entropy <= math.log(256) + 1e-5).all()


def test_lora_trains_only_adapters(tiny_openvla):
    vla, _ = load_openvla(tiny_openvla)
    make_trainable(vla, lora_rank=4, lora_alpha=8)
    trainable = [n for n, p in vla.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("fused_featurizer" in n for n in trainable) and any(
        "language_model.model.layers" in n for n in trainable
    )
    assert not any("lm_head" in n for n in trainable)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_every_trainable_parameter_gets_a_gradient(tiny_openvla, lora_rank):
    """DDP (find_unused_parameters=False) fails on trainable parameters the forward never reaches."""
    vla, processor = load_openvla(tiny_openvla)
    make_trainable(vla, lora_rank=lora_rank, lora_alpha=8)
    agent = ActorCritic(vla, ActionTokenizer(vla.vocab_size))
    ids, mask = processor.prompt_ids(["push the cube"])
    pixels = processor.preprocess_images(torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8))
    tokens = torch.full((1, 7), agent.first_action_token + 3)
    logprob, _, value = agent(pixels, ids, mask, tokens, 1.0)
    (logprob.sum() + value.sum()).backward()
    missing = [n for n, p in agent.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_grasp_shaped_reward_is_a_potential_difference():
    shaped = GraspShapedReward(num_envs=2)
    info = lambda g, s: {"grasped": torch.tensor(g), "success": torch.tensor(s)}
    r1 = shaped(info([True, False], [False, False]))
    r2 = shaped(info([True, True], [True, False]))
    r3 = shaped(info([False, False], [False, False]))
    torch.testing.assert_close(r1, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(r2, torch.tensor([1.0, 0.1]))  # success while grasped: +1
    torch.testing.assert_close(r1 + r2 + r3, torch.zeros(2))  # dropping everything returns the potential
    for _ in range(5):  # held for 5 steps: + 0.1 consecutive-grasp bonus on the 5th
        r = shaped(info([True, False], [False, False]))
    torch.testing.assert_close(r, torch.tensor([0.1, 0.0]))
    shaped.reset(torch.tensor([True, False]))  # a new episode starts from potential 0
    torch.testing.assert_close(shaped(info([True, False], [False, False])), torch.tensor([0.1, 0.0]))


def test_to_env_action_unnormalises_and_binarises_the_gripper():
    """xyz/rotation un-normalised with q01/q99; the gripper in [0, 1] becomes +1 (open) above 0.5, else -1."""
    from ppo_openvla import to_env_action

    tokenizer = ActionTokenizer(vocab_size=1000)
    stats = {"q01": [-0.1] * 6 + [0.0], "q99": [0.1] * 6 + [1.0], "mask": [True] * 6 + [False]}
    normalized = torch.tensor([[-1.0, 0.0, 1.0, 0.5, -0.5, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7]])
    action = to_env_action(tokenizer.normalized_to_tokens(normalized), tokenizer, stats)
    # bin centres are within half a bin (1/127.5) of the normalised values: 0.1 x that in metres
    torch.testing.assert_close(action[0, :6], 0.1 * normalized[0, :6], atol=0.1 / 127.5, rtol=0)
    assert action[:, 6].tolist() == [-1.0, 1.0]  # a "close" of 0.3 must not half-open the gripper
