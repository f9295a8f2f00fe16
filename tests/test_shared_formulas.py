"""The formulas the scripts deliberately repeat (each file stands alone) must be the same functions: same names, same
signatures, same results."""

import inspect

import numpy as np
import pytest
import torch

import grpo_internvl
import ppo_openvla
import srpo_openvla_oft

SHARED = ["group_advantages", "keep_groups", "clipped_token_loss"]


@pytest.mark.parametrize("name", SHARED)
def test_shared_functions_have_identical_source(name):
    """GRPO and SRPO hold the same text for each shared formula (a diff of the scripts shows no drift here)."""
    assert inspect.getsource(getattr(grpo_internvl, name)) == inspect.getsource(getattr(srpo_openvla_oft, name))


def test_group_advantages_agree():
    rewards = torch.tensor([5.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, 0.0, 3.2, 0.4, 5.0])  # groups of 4
    grpo = grpo_internvl.group_advantages(rewards, group_size=4)
    torch.testing.assert_close(grpo, srpo_openvla_oft.group_advantages(rewards, group_size=4))
    assert torch.equal(grpo[4:8], torch.zeros(4))  # an all-success group carries no signal


def test_dynamic_sampling_filters_agree():
    success = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]).bool()
    grpo = grpo_internvl.keep_groups(success, 4, (0.1, 0.9))
    assert torch.equal(grpo, srpo_openvla_oft.keep_groups(success, 4, (0.1, 0.9)))
    assert grpo.view(4, 4)[:, 0].tolist() == [True, False, False, True]


def test_clipped_token_loss_reduces_to_ppo():
    """With one token per sample and a symmetric clip, the token loss is PPO's action-level policy loss."""
    torch.manual_seed(0)
    new, old = torch.randn(3, 1) * 0.3, torch.randn(3, 1) * 0.3
    adv = torch.tensor([1.0, -2.0, 0.5])
    token_loss, _, _ = grpo_internvl.clipped_token_loss(new, old, adv, torch.ones(3, 1), 0.2, 0.2, num_tokens=3)
    zeros = torch.zeros(3)
    ppo_pg, _, _, _ = ppo_openvla.ppo_losses(new[:, 0], old[:, 0], adv, zeros, zeros, zeros, 0.2, 0.2, 10.0)
    torch.testing.assert_close(token_loss, ppo_pg)


def test_openvla_and_oft_unnormalisation_agree():
    stats = {"q01": [-0.5] * 6 + [0.0], "q99": [0.5] * 6 + [1.0], "mask": [True] * 6 + [False]}
    normalized = torch.from_numpy(np.linspace(-1, 1, 14, dtype=np.float32)).view(2, 7)
    plain = ppo_openvla.ActionTokenizer.unnormalize(normalized, stats)
    oft = ppo_openvla.ActionTokenizer.unnormalize(normalized, stats, eps=1e-8)
    torch.testing.assert_close(plain, oft)
    torch.testing.assert_close(plain[:, 6], normalized[:, 6])  # the gripper is not un-normalised
