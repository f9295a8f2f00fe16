"""SRPO progress reward: DBSCAN / distance / sigmoid on constructed embeddings, and the V-JEPA 2 pipeline."""

import numpy as np
import pytest
import torch

from common.models.tiny import make_tiny_vjepa2
from common.models.vjepa2 import VideoEmbedder, preprocess_video, subsample_frame_indices
from srpo_openvla_oft import progress_rewards


@pytest.fixture(scope="module")
def tiny_vjepa2(tmp_path_factory):
    return make_tiny_vjepa2(str(tmp_path_factory.mktemp("tiny-vjepa2")))


def _task_batch(rng):
    """8 rollouts of one task: 4 successes near the origin, 4 failures at growing distances."""
    succ = rng.normal(0.0, 0.01, size=(4, 16))
    fail = np.zeros((4, 16))
    fail[:, 0] = [3.0, 1.0, 7.0, 2.0]  # failure 1 is nearest the success cluster
    return np.concatenate([succ, fail]), np.array([True] * 4 + [False] * 4)


def test_successes_one_nearest_failure_largest_and_range():
    emb, success = _task_batch(np.random.default_rng(0))
    rewards, num_clusters = progress_rewards(emb, success, np.zeros(8, dtype=int))
    assert np.all(rewards[:4] == 1.0)
    fail_rewards = rewards[4:]
    assert np.argmax(fail_rewards) == 1 and np.argmin(fail_rewards) == 2
    assert np.all((fail_rewards > 0) & (fail_rewards < 0.6))
    assert fail_rewards[1] == pytest.approx(0.6 / (1 + np.exp(-5)))  # n = 0 -> 0.6 sigmoid(5)
    assert num_clusters == 1
    # monotone in distance
    order = np.argsort([3.0, 1.0, 7.0, 2.0])
    assert np.all(np.diff(fail_rewards[order]) < 0)


def test_paper_variant_monotone_and_bounded():
    emb, success = _task_batch(np.random.default_rng(1))
    rewards, _ = progress_rewards(emb, success, np.zeros(8, dtype=int), variant="paper", alpha=0.8)
    fail_rewards = rewards[4:]
    assert np.argmax(fail_rewards) == 1 and np.all((fail_rewards > 0) & (fail_rewards < 0.8))


def test_all_fail_task_gets_zero_and_tasks_are_independent():
    emb, success = _task_batch(np.random.default_rng(2))
    all_fail = np.random.default_rng(3).normal(size=(4, 16))
    embeddings = np.concatenate([emb, all_fail])
    success = np.concatenate([success, np.zeros(4, dtype=bool)])
    task_ids = np.array([0] * 8 + [1] * 4)
    rewards, _ = progress_rewards(embeddings, success, task_ids)
    assert np.all(rewards[8:] == 0.0)
    alone, _ = progress_rewards(emb, success[:8], np.zeros(8, dtype=int))
    np.testing.assert_allclose(rewards[:8], alone)


def test_single_success_is_its_own_centre_and_single_failure_gets_half_range():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(4, 16))
    success = np.array([True, False, False, False])
    rewards, num_clusters = progress_rewards(emb, success, np.zeros(4, dtype=int))
    assert rewards[0] == 1.0 and num_clusters == 1  # DBSCAN marks it noise -> mean of successes
    dist = np.linalg.norm(emb[1:] - emb[0], axis=1)
    assert np.argmax(rewards[1:]) == np.argmin(dist)
    one_fail, _ = progress_rewards(emb[:2], success[:2], np.zeros(2, dtype=int))
    assert one_fail[1] == pytest.approx(0.3)  # range < 1e-6 -> n = 0.5 -> 0.6 sigmoid(0)


def test_two_success_clusters_use_nearest_centre():
    succ = np.zeros((4, 8))
    succ[:, 0] = [0.0, 0.01, 10.0, 10.01]  # two well-separated success modes
    fail = np.zeros((2, 8))
    fail[0, 0], fail[1, 0] = 9.0, 5.0  # 9 is close to the second mode, 5 is between
    rewards, num_clusters = progress_rewards(
        np.concatenate([succ, fail]), np.array([True] * 4 + [False] * 2), np.zeros(6, dtype=int)
    )
    assert num_clusters == 2 and rewards[4] > rewards[5]


def test_frame_subsampling_short_and_long():
    np.testing.assert_array_equal(subsample_frame_indices(3, 8), [0, 1, 2, 0, 1, 2, 0, 1])
    long = subsample_frame_indices(521, 64)
    assert len(long) == 64 and long[0] == 0 and long[-1] == 520 and np.all(np.diff(long) > 0)
    np.testing.assert_array_equal(subsample_frame_indices(64, 64), np.arange(64))


def test_preprocess_video_shapes_and_normalisation():
    frames = np.full((10, 224, 224, 3), 255, dtype=np.uint8)
    clip = preprocess_video(frames, size=32, num_frames=16)
    assert clip.shape == (16, 3, 32, 32)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(clip[0, :, 5, 5], expected)
    wide = preprocess_video(np.zeros((70, 48, 96, 3), dtype=np.uint8), size=32, num_frames=64)
    assert wide.shape == (64, 3, 32, 32)


def test_vjepa2_embedder_on_tiny_checkpoint(tiny_vjepa2):
    embedder = VideoEmbedder(tiny_vjepa2, device=torch.device("cpu"), num_frames=16)
    videos = [
        np.random.default_rng(i).integers(0, 255, size=(t, 40, 40, 3), dtype=np.uint8)
        for i, t in enumerate([5, 30, 16])
    ]
    emb = embedder(videos, batch_size=2)
    assert emb.shape == (3, 48) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    again = embedder(videos[1:2])
    torch.testing.assert_close(again[0], emb[1], atol=1e-5, rtol=1e-5)
    # the LIBERO workers send only the frames the embedder samples: those give the whole video's embeddings
    picked = [video[subsample_frame_indices(len(video), 16)] for video in videos]
    torch.testing.assert_close(embedder(picked, batch_size=2), emb, atol=0, rtol=0)


def test_embedder_rejects_non_vjepa2(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not V-JEPA 2"):
        VideoEmbedder(str(tmp_path), device=torch.device("cpu"))
