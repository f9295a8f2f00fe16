"""SRPO's GRPO pieces: dynamic sampling, group advantages, the clipped token-mean loss."""

import torch

from srpo_openvla_oft import clipped_token_loss, group_advantages, keep_groups


def test_dynamic_sampling_keeps_mixed_groups():
    success = torch.tensor([0] * 8 + [1] + [0] * 7 + [1] * 7 + [0] + [1] * 8, dtype=torch.bool)  # 0/8, 1/8, 7/8, 8/8
    assert keep_groups(success, 8, (0.1, 0.9)).view(4, 8)[:, 0].tolist() == [False, True, True, False]


def test_group_advantages():
    scores = torch.tensor([[5.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [5.0, 2.5, 0.3, 0.0]], dtype=torch.float64)
    adv = group_advantages(scores.flatten(), 4).view(3, 4)
    torch.testing.assert_close(adv[0], ((scores[0] - 1.25) / (scores[0].std() + 1e-6)).float())  # unbiased std
    assert torch.all(adv[1] == 0)
    assert torch.all(adv[2][:-1] > adv[2][1:])  # a failure closer to success gets a larger advantage
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-6, rtol=0)


def test_clipped_token_loss_asymmetric_clip_and_masked_token_mean():
    old = torch.zeros(2, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.1], [1.5, 0.5, 1.0, 9.0]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # the last token of row 2 was never executed
    loss, approx_kl, clipfrac = clipped_token_loss(new, old, adv, mask, 0.2, 0.28, num_tokens=7.0)
    # row 1 (A > 0): min(r, clip(r)) -> 1.28, 0.5, 1.0, 1.1; row 2 (A < 0): max(r, clip(r)) -> 1.5, 0.8, 1.0
    expected = -(1.28 + 0.5 + 1.0 + 1.1) + (1.5 + 0.8 + 1.0)
    torch.testing.assert_close(loss, torch.tensor(expected / 7.0))
    assert abs(clipfrac.item() - 4 / 7) < 1e-6  # 1.5 and 0.5 in both rows
    ratio = new.exp()
    k3 = ((ratio - 1) - new) * mask
    torch.testing.assert_close(approx_kl, k3.sum() / 7.0)
    new.requires_grad_(True)
    loss, _, _ = clipped_token_loss(new, old, adv, mask, 0.2, 0.28, num_tokens=7.0)
    loss.backward()
    assert new.grad[1, 3] == 0 and new.grad[0, 0] == 0 and new.grad[0, 1] != 0  # masked / clipped tokens: no gradient


def test_unnorm_key_prefers_the_suite_then_no_noops(tmp_path):
    """SimpleVLA-RL's order: `{suite}` when the statistics have it, else `{suite}_no_noops`."""
    from srpo_openvla_oft import load_action_stats

    def stats(low):
        return {"action": {"q01": [low] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}

    config = {"norm_stats": {"libero_10": stats(-1.0), "libero_10_no_noops": stats(-2.0), "other": stats(-3.0)}}
    assert load_action_stats(str(tmp_path), config, "libero_10", None)["q01"][0] == -1.0
    del config["norm_stats"]["libero_10"]
    assert load_action_stats(str(tmp_path), config, "libero_10", None)["q01"][0] == -2.0
    assert load_action_stats(str(tmp_path), config, "libero_10", "other")["q01"][0] == -3.0
