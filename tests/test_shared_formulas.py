"""The formulas the scripts deliberately repeat (each file stands alone) must agree with each other."""

import numpy as np
import torch

import grpo_internvl
import ppo_openvla
import srpo_openvla_oft


def test_group_advantages_agree():
    rewards = torch.tensor([5.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, 0.0, 3.2, 0.4, 5.0])  # groups of 4
    grpo = grpo_internvl.group_advantages(rewards, group_size=4)
    srpo = srpo_openvla_oft.grpo_advantages(rewards.view(3, 4)).reshape(-1)
    torch.testing.assert_close(grpo, srpo)
    assert torch.equal(grpo[4:8], torch.zeros(4))  # an all-success group carries no signal
    single = torch.tensor([2.0, -1.0])
    torch.testing.assert_close(grpo_internvl.group_advantages(single, 1), srpo_openvla_oft.grpo_advantages(single.view(2, 1)).reshape(-1))


def test_dynamic_sampling_filters_agree():
    success = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0])
    grpo = grpo_internvl.groups_kept(success, group_size=4, low=0.1, high=0.9).view(4, 4)[:, 0]
    srpo = srpo_openvla_oft.keep_groups(success.numpy(), 4, (0.1, 0.9))
    assert grpo.tolist() == srpo.tolist() == [True, False, False, True]


def test_clipped_token_losses_agree_and_reduce_to_ppo():
    torch.manual_seed(0)
    new, old = torch.randn(3, 5) * 0.3, torch.randn(3, 5) * 0.3
    adv = torch.tensor([1.0, -2.0, 0.5])
    per_token, _ = grpo_internvl.grpo_loss(new, old, adv, None, clip_low=0.2, clip_high=0.28, kl_coef=0.0)
    srpo_loss, _, _ = srpo_openvla_oft.clipped_token_loss(new, old, adv[:, None], torch.ones(3, 5), 0.2, 0.28, num_tokens=15)
    torch.testing.assert_close(per_token.mean(), srpo_loss)
    # With one token per sample and a symmetric clip, the token loss is PPO's action-level policy loss.
    per_token, _ = grpo_internvl.grpo_loss(new[:, :1], old[:, :1], adv, None, clip_low=0.2, clip_high=0.2, kl_coef=0.0)
    ppo_pg, _, _, _ = ppo_openvla.ppo_losses(new[:, 0], old[:, 0], adv, torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.2, 0.2, 10.0)
    torch.testing.assert_close(per_token.mean(), ppo_pg)


def test_openvla_and_oft_unnormalisation_agree():
    stats = {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}
    normalized = torch.from_numpy(np.linspace(-1, 1, 14, dtype=np.float32)).view(2, 7)
    plain = ppo_openvla.ActionTokenizer.unnormalize(normalized, stats)
    oft = ppo_openvla.ActionTokenizer.unnormalize(normalized, stats, eps=1e-8)
    torch.testing.assert_close(plain, oft)
    torch.testing.assert_close(plain[:, 6], normalized[:, 6])  # the gripper is not un-normalised
