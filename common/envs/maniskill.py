"""ManiSkill3 for VLA policies: a batch of envs that returns camera images, instructions and per-step rewards.

GPU machine: one process simulates all envs (`physx_cuda`, GPU rendering).
CPU machine: ManiSkill's CPU backend simulates one env per `gym.make`, so the batch is split over worker processes
(gymnasium AsyncVectorEnv), one per core, each stepping its slice of envs in turn, rendered by Mesa's lavapipe Vulkan
driver (see scripts/setup.sh). A worker's first env costs ~5 s of CPU (lavapipe compiles its shaders once per
process), its further envs ~0.3 s each: on 2 cores 16 envs are ready in 36 s, against 136-169 s with one process per
env.
Both paths share this interface:

    env = ManiSkillVLAEnv("PickCube-v1", num_envs=4)
    obs = env.reset(seeds=[0, 1, 2, 3])          # {"rgb": uint8 (N, H, W, 3), "tcp_pose": (N, 7)}
    obs, reward, terminated, truncated, info = env.step(actions)   # actions (N, 7) in [-1, 1]

Finished envs are reset inside `step` (the returned obs is the first one of the new episode), `info["final_obs"]` holds
the last observation of the finished episode, for bootstrapping truncations, and `info["reset_mask"]` says which envs
started a new episode: their `env.instructions[i]` may have changed (tasks that draw objects per episode).
Eval mode (`ignore_terminations=True`, the RLinf evaluation protocol): episodes run their full length after success;
`info["success_once"]` (ever succeeded this episode) and `info["success"]` at truncation give both success rates.

Camera: the Bridge / "InScene" digital twins (mani-skill's BaseDigitalTwinEnv) render their intrinsic-defined
3rd_view_camera at its native 640x480 (overriding width/height would render a crop while the greenscreen background is
squashed), with obs_mode "rgb+segmentation" and the "default" shader, as RLinf's ManiSkill configs set them; frames are
(N, 480, 640, 3) and the model's processor resizes them. Other tasks render square `image_size` frames.

CPU workers that die (or hang past `step_timeout_s`) are respawned: the current episodes are replayed from their seeds
and actions (ManiSkill's CPU physics is deterministic), then the step is retried; `worker_restarts` counts respawns.
The reward is the task's own (sparse success, or ManiSkill's normalized dense reward with `dense_reward=True`);
`info` also carries the grasp signal of tasks that report one, so a script can shape its own reward from it.
"""

import concurrent.futures
import multiprocessing
import os
from typing import Optional

import gymnasium as gym
import numpy as np
import torch

from common.guards import exit_with_parent

# Instructions for the tasks that need no downloaded assets. Tasks with a `get_language_instruction()` method
# (the Bridge / "InScene" digital twins) use their own; anything else needs `--instruction`.
INSTRUCTIONS = {
    "PushCube-v1": "push the cube to the goal region",
    "PickCube-v1": "pick up the cube and move it to the goal position",
    "StackCube-v1": "stack the red cube on top of the green cube",
    "PullCube-v1": "pull the cube to the goal region",
    "PokeCube-v1": "use the peg to poke the cube to the goal region",
    "PlaceSphere-v1": "place the sphere into the bin",
    "LiftPegUpright-v1": "lift the peg and stand it upright",
    "PegInsertionSide-v1": "insert the peg into the hole on the side of the box",
    "RollBall-v1": "push the ball so that it rolls into the goal region",
}
UNSUPPORTED = {
    "PushT-v1": "its robot (panda_stick) has no gripper: its actions are 6-dim, a VLA sends 7 (arm delta + gripper)",
}
GRASP_KEYS = ("is_src_obj_grasped", "is_grasped")  # Bridge tasks, ManiSkill tasks: reported as info["grasped"]
WORKER_DEATH = (EOFError, ConnectionError, BrokenPipeError, multiprocessing.TimeoutError)


def registered_env_ids() -> list[str]:
    import mani_skill.envs  # noqa: F401  (registers the tasks)
    from mani_skill.utils.registration import REGISTERED_ENVS

    import common.envs.put_on_plate_25  # noqa: F401  (registers PutOnPlateInScene25Main-v3)
    import common.envs.put_on_plate_25_ood  # noqa: F401  (registers its 13 out-of-distribution variants)

    return sorted(REGISTERED_ENVS)


def is_digital_twin(env_id: str) -> bool:
    """Bridge / "InScene" tasks: an intrinsic-defined camera, a greenscreened real background, rgb+segmentation."""
    from mani_skill.envs.tasks.digital_twins.base_env import BaseDigitalTwinEnv
    from mani_skill.utils.registration import REGISTERED_ENVS

    return issubclass(REGISTERED_ENVS[env_id].cls, BaseDigitalTwinEnv)


def is_put_on_plate_25(env_id: str) -> bool:
    """PutOnPlateInScene25Main-v3 or one of its variants (they take `obj_set`)."""
    from mani_skill.utils.registration import REGISTERED_ENVS

    from common.envs.put_on_plate_25 import PutOnPlateInScene25MainV3

    return env_id in registered_env_ids() and issubclass(REGISTERED_ENVS[env_id].cls, PutOnPlateInScene25MainV3)


def obj_set_kwargs(env_id: str, obj_set: str) -> dict:
    """gym.make kwargs of --obj-set, the object/background split (train/test/all) of PutOnPlateInScene25Main-v3 and its
    out-of-distribution variants. Other tasks have no split: for them only the default "train" is accepted."""
    if is_put_on_plate_25(env_id):
        return {"obj_set": obj_set}
    if obj_set != "train":
        raise ValueError(f"--obj-set {obj_set} applies to the PutOnPlateInScene25 tasks only, not --env-id {env_id}")
    return {}


def check_env_id(env_id: str) -> None:
    """Fail fast (before any simulator starts) on an unknown or unsupported task, or one whose assets are missing."""
    from mani_skill.utils.registration import REGISTERED_ENVS

    from common.envs.put_on_plate_25 import download_command

    registered = registered_env_ids()
    if env_id not in registered:
        raise ValueError(
            f"--env-id {env_id!r} is not a ManiSkill3 task. Tasks with built-in instructions (no asset download): "
            f"{', '.join(INSTRUCTIONS)}. All registered ids: {', '.join(registered)}."
        )
    if env_id in UNSUPPORTED:
        raise ValueError(f"--env-id {env_id} is not supported: {UNSUPPORTED[env_id]}.")
    missing = REGISTERED_ENVS[env_id].cls.missing_assets() if is_put_on_plate_25(env_id) else []
    if missing:
        raise FileNotFoundError(
            f"--env-id {env_id} needs assets that are not on disk ({len(missing)} files, e.g. "
            f"{missing[0]}). Download them with: {download_command()}"
        )


def check_render_device() -> None:
    """SAPIEN needs a Vulkan device to render camera images; say how to get one if there is none."""
    import sapien

    try:
        sapien.render.RenderSystem()
    except RuntimeError as e:
        raise RuntimeError(
            f"ManiSkill cannot render ({e}). With an NVIDIA GPU, install the driver's Vulkan ICD (libnvidia-gl). "
            "Without a GPU, install Mesa's software Vulkan driver >= 24.3: run `bash scripts/setup.sh` "
            "(apt-get install -t bookworm-backports mesa-vulkan-drivers libvulkan1 on Debian 12)."
        ) from e


class _VLAObservation(gym.ObservationWrapper):
    """Keep only what a VLA needs: the first camera's RGB image and the end-effector pose (the task's `tcp_pose`, or the
    pose of the robot's tcp / ee_gripper_link for tasks that do not report one). In a CPU worker it also answers the
    instruction of the current episode and replays an episode (worker respawn)."""

    def __init__(self, env: gym.Env, batched: bool):
        super().__init__(env)
        self.batched = batched
        space = env.unwrapped.single_observation_space
        camera = next(iter(space["sensor_data"].values()))
        shape = (env.unwrapped.num_envs, 7) if batched else (7,)
        pose_space = space["extra"].get("tcp_pose", gym.spaces.Box(-np.inf, np.inf, (7,), np.float32))
        if pose_space.shape[-1:] == (7,):
            pose_space = gym.spaces.Box(-np.inf, np.inf, shape, np.float32)
        rgb = camera["rgb"]
        rgb = gym.spaces.Box(0, 255, (env.unwrapped.num_envs, *rgb.shape) if batched else rgb.shape, np.uint8)
        self.observation_space = gym.spaces.Dict({"rgb": rgb, "tcp_pose": pose_space})
        self.pending_replay = None

    def _tcp_pose(self, obs):
        if "tcp_pose" in obs["extra"]:
            return obs["extra"]["tcp_pose"]
        agent = self.env.unwrapped.agent
        link = getattr(agent, "tcp", None) or agent.robot.links_map["ee_gripper_link"]
        pose = link.pose.raw_pose
        return pose if self.batched else pose[0].cpu().numpy()

    def observation(self, obs):
        camera = next(iter(obs["sensor_data"].values()))
        return {"rgb": camera["rgb"], "tcp_pose": self._tcp_pose(obs)}

    def instruction(self) -> Optional[str]:
        get = getattr(self.env.unwrapped, "get_language_instruction", None)
        return get()[0] if get else None

    def replay(self):
        """Reset with the episode's seed and redo its actions (set in `pending_replay` as (seed, actions)); returns the
        observation reached."""
        seed, actions = self.pending_replay
        obs, _ = self.reset(seed=seed)
        for action in actions:
            obs = self.step(action)[0]
        self.pending_replay = None
        return obs


class _EnvSlice(gym.Env):
    """The envs offset .. offset + k - 1 of the batch, held by one worker process and stepped one after the other.
    Observations, rewards and the info signals come back stacked along a first axis of k; reset takes the seeds and
    the reset mask of the whole batch in `options` and picks its own."""

    def __init__(self, envs: list, offset: int):
        self.envs, self.offset = envs, offset
        self.observation_space = gym.vector.utils.batch_space(envs[0].observation_space, len(envs))
        self.action_space = gym.vector.utils.batch_space(envs[0].action_space, len(envs))
        self.metadata, self.render_mode = envs[0].metadata, envs[0].render_mode
        self.obs = [None] * len(envs)
        self.pending_replay = None

    def _stacked(self):
        return {k: np.stack([obs[k] for obs in self.obs]) for k in self.obs[0]}

    def reset(self, *, seed=None, options=None):
        mine = slice(self.offset, self.offset + len(self.envs))
        seeds, mask = options["seeds"][mine], options.get("env_mask")
        for i, env in enumerate(self.envs):
            if mask is None or mask[mine][i]:
                self.obs[i], _ = env.reset(seed=seeds[i])
        return self._stacked(), {}

    def step(self, actions):
        rewards, terminated, truncated, infos = [], [], [], []
        for i, (env, action) in enumerate(zip(self.envs, actions)):
            self.obs[i], reward, term, trunc, info = env.step(action)
            rewards.append(reward), terminated.append(term), truncated.append(trunc), infos.append(info)
        keys = [k for k in ("success", *GRASP_KEYS, "consecutive_grasp") if k in infos[0]]
        info = {k: np.array([np.asarray(i[k]).item() for i in infos]) for k in keys}
        return self._stacked(), np.array(rewards, np.float32), np.array(terminated), np.array(truncated), info

    def instruction(self) -> list[Optional[str]]:
        return [env.instruction() for env in self.envs]

    def replay(self) -> None:
        """Bring every env back to where it was (worker respawn): `pending_replay` holds (seed, actions) per env."""
        for i, (env, (seed, actions)) in enumerate(zip(self.envs, self.pending_replay)):
            env.pending_replay = (seed, actions)
            self.obs[i] = env.replay()
        self.pending_replay = None

    def close(self):
        for env in self.envs:
            env.close()


class _CPUEnvFactory:
    """Builds the slice of `count` ManiSkill CPU envs that starts at `offset`, in a worker process. AsyncVectorEnv also
    calls the first factory once in the calling process just to read the spaces: there it returns a simulator-free
    stand-in with the spaces probed in a subprocess, so the trainer process never builds a scene (and mani-skill's asset
    folder is the one MS_ASSET_DIR names now)."""

    def __init__(self, env_id: str, make_kwargs: dict, asset_dir: Optional[str], offset: int = 0, count: int = 1):
        self.env_id, self.make_kwargs, self.asset_dir, self.spaces = env_id, make_kwargs, asset_dir, None
        self.offset, self.count = offset, count
        self.trainer_pid = os.getpid()  # the workers' forkserver exits with this process; the workers follow

    def build_slice(self) -> _EnvSlice:
        exit_with_parent(self.trainer_pid)
        return _EnvSlice([self.build() for _ in range(self.count)], self.offset)

    def build(self) -> gym.Env:
        if self.asset_dir:  # before mani_skill is imported: it reads its asset folder once
            os.environ["MS_ASSET_DIR"] = self.asset_dir
        import mani_skill.envs  # noqa: F401  (runs in the worker process)
        from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

        import common.envs.put_on_plate_25  # noqa: F401
        import common.envs.put_on_plate_25_ood  # noqa: F401

        torch.set_num_threads(1)  # one core per env process; the policy process keeps the rest
        env = gym.make(self.env_id, num_envs=1, sim_backend="physx_cpu", **self.make_kwargs)
        return _VLAObservation(CPUGymWrapper(env), batched=False)  # numpy in and out, batch dim of 1 removed

    def __call__(self) -> gym.Env:
        if multiprocessing.parent_process() is not None:
            return self.build_slice()
        if self.spaces is None:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=_forkserver()) as pool:
                observation_space, action_space, *rest = pool.submit(_probe_spaces, self).result()
            batched = [gym.vector.utils.batch_space(space, self.count) for space in (observation_space, action_space)]
            self.spaces = (*batched, *rest)
        return _SpacesOnly(*self.spaces)


def _forkserver() -> multiprocessing.context.BaseContext:
    """The "forkserver" start method (workers forked from a server that has imported the script once), its server made
    to exit with this process: the workers exit with the server (see common/envs/forkserver_exit.py). Python keeps one
    forkserver per process; the preload list applies when it starts."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "common.envs.forkserver_exit"])
    return context


def _probe_spaces(factory: _CPUEnvFactory):
    """The spaces of one env (the slice's are these batched)."""
    exit_with_parent(factory.trainer_pid)
    env = factory.build()
    spaces = (env.observation_space, env.action_space, dict(env.metadata), env.render_mode)
    env.close()
    return spaces


class _SpacesOnly(gym.Env):
    def __init__(self, observation_space, action_space, metadata, render_mode):
        self.observation_space, self.action_space, self.metadata, self.render_mode = (
            observation_space,
            action_space,
            metadata,
            render_mode,
        )


def make_cpu_env(env_id: str, make_kwargs: dict) -> gym.Env:
    """One CPU env in this process, built exactly as each worker of ManiSkillVLAEnv builds its own (obs {"rgb",
    "tcp_pose"} in numpy): for tools that also need the simulator state, like the demo collector."""
    return _CPUEnvFactory(env_id, make_kwargs, os.environ.get("MS_ASSET_DIR")).build()


HELD_OUT_SEED_BASE = 2**31  # training reset seeds, auto-reset ones included, lie below; evaluation's from here up


def next_episode_seed(seed: int) -> int:
    """The seed of the episode that follows one started with `seed` (auto-reset): envs sharing a seed keep sharing."""
    return int(np.random.default_rng(seed).integers(HELD_OUT_SEED_BASE))


def held_out_seeds(rank: int, num_envs: int) -> list[int]:
    """Evaluation's reset seeds for one rank's envs: 2**31 + rank * num_envs + i, never drawn for training, the same
    set for every run with the same layout."""
    return [HELD_OUT_SEED_BASE + rank * num_envs + i for i in range(num_envs)]


class ManiSkillVLAEnv:
    def __init__(
        self,
        env_id: str,
        num_envs: int,
        image_size: Optional[int] = 224,
        dense_reward: bool = False,
        instruction: Optional[str] = None,
        max_episode_steps: Optional[int] = None,
        control_mode: Optional[str] = None,
        sim_backend: str = "auto",
        ignore_terminations: bool = False,
        env_kwargs: Optional[dict] = None,
        max_worker_restarts: int = 2,
        step_timeout_s: float = 600.0,
    ):
        """control_mode None: pd_ee_delta_pose, or the robot's only controller for the digital twins. env_kwargs go to
        gym.make (e.g. obj_set="test" for PutOnPlateInScene25Main-v3 and its variants). ignore_terminations: eval mode
        (see above)."""
        check_env_id(env_id)
        check_render_device()
        import mani_skill.envs  # noqa: F401

        self.env_id, self.num_envs = env_id, num_envs
        self.ignore_terminations, self.instruction_override = ignore_terminations, instruction
        self.max_worker_restarts, self.step_timeout_s, self.worker_restarts = max_worker_restarts, step_timeout_s, 0
        self.gpu = sim_backend == "gpu" or (sim_backend == "auto" and torch.cuda.is_available())
        twin = is_digital_twin(env_id)
        if twin and dense_reward:
            raise ValueError(f"--env-id {env_id} has no dense reward (reward mode 'none'); shape from success/grasp")
        make_kwargs = dict(
            obs_mode="rgb+segmentation" if twin else "rgb",
            reward_mode="none" if twin else "normalized_dense" if dense_reward else "sparse",
            render_mode="rgb_array",
            **(env_kwargs or {}),
        )
        if control_mode or not twin:
            make_kwargs["control_mode"] = control_mode or "pd_ee_delta_pose"
        if twin:
            make_kwargs["sensor_configs"] = dict(shader_pack="default")  # native resolution of the intrinsic camera
        elif image_size:
            make_kwargs["sensor_configs"] = dict(width=image_size, height=image_size)
        if max_episode_steps:
            make_kwargs["max_episode_steps"] = max_episode_steps
        self._make_kwargs, self._factories = make_kwargs, None

        if self.gpu:
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

            base = gym.make(env_id, num_envs=num_envs, sim_backend="physx_cuda", **make_kwargs)
            self._observation = _VLAObservation(base, batched=True)
            self.env = ManiSkillVectorEnv(self._observation, auto_reset=False, ignore_terminations=ignore_terminations)
        else:
            self.env = self._spawn_cpu_envs()
        self.max_episode_steps = max_episode_steps or gym.spec(env_id).max_episode_steps
        space = self.env.single_action_space  # (A,), or (envs per worker, A) on CPU
        self.action_low = torch.as_tensor(space.low.reshape(-1, space.shape[-1])[0], dtype=torch.float32)
        self.action_high = torch.as_tensor(space.high.reshape(-1, space.shape[-1])[0], dtype=torch.float32)
        self.image_shape = tuple(self.env.single_observation_space["rgb"].shape[-3:-1])  # (H, W) of the camera
        self._seeds = [None] * num_envs  # per env: the seed of its current episode and the actions taken since
        self._actions: list[list[np.ndarray]] = [[] for _ in range(num_envs)]
        self.success_once = torch.zeros(num_envs, dtype=torch.bool)
        self.instructions = [None] * num_envs
        self._refresh_instructions(torch.ones(num_envs, dtype=torch.bool))

    def _spawn_cpu_envs(self) -> gym.vector.AsyncVectorEnv:
        if self._factories is None:  # equal slices, one worker per available core
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            self.num_workers = max(w for w in range(1, min(cores, self.num_envs) + 1) if self.num_envs % w == 0)
            k, asset_dir = self.num_envs // self.num_workers, os.environ.get("MS_ASSET_DIR")
            self._factories = [
                _CPUEnvFactory(self.env_id, self._make_kwargs, asset_dir, w * k, k) for w in range(self.num_workers)
            ]
        return gym.vector.AsyncVectorEnv(
            self._factories,
            autoreset_mode=gym.vector.AutoresetMode.DISABLED,
            context=_forkserver().get_start_method(),
        )

    def _refresh_instructions(self, mask: torch.Tensor) -> None:
        """Re-read the instruction of the envs in `mask` (objects, hence instructions, can change per episode)."""
        if self.gpu:
            get = getattr(self.env.base_env, "get_language_instruction", None)
            current = get() if get else [None] * self.num_envs
        else:
            current = self._call("instruction")
        default = INSTRUCTIONS.get(self.env_id)
        for i in torch.nonzero(mask).flatten().tolist():
            self.instructions[i] = self.instruction_override or current[i] or default
        if any(text is None for text in self.instructions):
            raise ValueError(f"--env-id {self.env_id} has no built-in instruction: pass --instruction 'what to do'.")

    # -- CPU workers: calls that survive a dead worker ----------------------------------------------------------
    def _call(self, name: str) -> list:
        """Call a method of every env slice; one result per env."""
        return [x for per_worker in self._retry(lambda: self.env.call(name)) for x in per_worker]

    def _per_worker(self, values: list) -> list[list]:
        k = self.num_envs // self.num_workers
        return [values[w * k : (w + 1) * k] for w in range(self.num_workers)]

    def _per_env(self, x: np.ndarray) -> np.ndarray:
        """(workers, envs per worker, ...) -> (N, ...)"""
        return x.reshape(self.num_envs, *x.shape[2:])

    def _retry(self, fn):
        for attempt in range(self.max_worker_restarts + 1):
            try:
                return fn()
            except WORKER_DEATH as e:
                if attempt == self.max_worker_restarts:
                    self._kill_workers()
                    raise RuntimeError(
                        f"ManiSkill worker processes of {self.env_id} died {attempt + 1} times in a row "
                        f"({type(e).__name__}: {e}); gave up after {self.max_worker_restarts} restarts."
                    ) from e
                self._respawn()

    def _respawn(self) -> None:
        """Replace all workers, then bring every env back to where it was: reset with its episode's seed and redo the
        episode's actions."""
        self.worker_restarts += 1
        self._kill_workers()
        self.env = self._spawn_cpu_envs()
        if any(seed is None for seed in self._seeds):
            return
        episodes = [(seed, list(acts)) for seed, acts in zip(self._seeds, self._actions)]
        self.env.set_attr("pending_replay", self._per_worker(episodes))
        self.env.call("replay")

    def _kill_workers(self) -> None:
        for process in self.env.processes:
            if process.is_alive():
                process.kill()
        try:
            self.env.close(terminate=True)
        except WORKER_DEATH:  # the pipe of a dead worker is already broken
            pass

    def _cpu_step(self, actions: np.ndarray):
        def step():
            self.env.step_async(actions.reshape(self.num_workers, -1, actions.shape[-1]))
            return self.env.step_wait(timeout=self.step_timeout_s)

        obs, reward, terminated, truncated, info = self._retry(step)
        info = {k: self._per_env(v) for k, v in info.items() if not k.startswith("_")}
        obs = {k: self._per_env(v) for k, v in obs.items()}
        return obs, self._per_env(reward), self._per_env(terminated), self._per_env(truncated), info

    def _cpu_reset(self, seeds: list[int], mask: Optional[np.ndarray] = None):
        """Reset the envs in `mask` (all if None) with their seeds; only workers holding one of them are called."""

        def reset():
            options = {"seeds": list(seeds), "env_mask": mask}
            if mask is not None:  # AsyncVectorEnv's own mask, per worker
                options["reset_mask"] = mask.reshape(self.num_workers, -1).any(1)
            self.env.reset_async(options=options)
            return self.env.reset_wait(timeout=self.step_timeout_s)

        obs, _ = self._retry(reset)
        return {k: self._per_env(v) for k, v in obs.items()}

    # -- conversions between the two backends ------------------------------------------------------------------
    @staticmethod
    def _to_cpu(obs) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v).cpu() for k, v in obs.items()}

    @staticmethod
    def _step_info(info) -> dict[str, torch.Tensor]:
        """Per-env boolean signals of the step as CPU tensors (N,): success, and grasped / consecutive_grasp where the
        task reports them."""
        as_bool = lambda v: (v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))).cpu().bool()  # noqa: E731
        out = {"success": as_bool(info["success"])}
        grasp_key = next((k for k in GRASP_KEYS if k in info), None)
        if grasp_key:
            out["grasped"] = as_bool(info[grasp_key])
        if "consecutive_grasp" in info:
            out["consecutive_grasp"] = as_bool(info["consecutive_grasp"])
        return out

    # -- API --------------------------------------------------------------------------------------------------------
    def reset(self, seeds: list[int]) -> dict[str, torch.Tensor]:
        """Reset every env; envs given the same seed start from the same initial state (GRPO groups). Updates
        `instructions`."""
        assert len(seeds) == self.num_envs, f"need one seed per env ({self.num_envs}), got {len(seeds)}"
        self._seeds, self._actions = [int(s) for s in seeds], [[] for _ in range(self.num_envs)]
        self.success_once[:] = False
        trials = getattr(self.env.base_env, "total_num_trials", None) if self.gpu else None
        if trials:  # a task that draws its episode from an id (PutOnPlateInScene25): same seed, same episode
            episode_id = torch.tensor([s % trials for s in seeds], device=self.env.device)
            obs, _ = self.env.reset(seed=list(seeds), options=dict(episode_id=episode_id))
        elif self.gpu:
            obs, _ = self.env.reset(seed=list(seeds))
            obs = self._share_initial_states(seeds, obs)
        else:
            obs = self._cpu_reset(self._seeds)
        self._refresh_instructions(torch.ones(self.num_envs, dtype=torch.bool))
        return self._to_cpu(obs)

    def _share_initial_states(self, seeds: list[int], obs):
        """The GPU sim draws one batch of random initial states; copy the first env of each seed to its twins."""
        first = {s: i for i, s in reversed(list(enumerate(seeds)))}
        source = [first[s] for s in seeds]
        if source == list(range(self.num_envs)):
            return obs
        base = self.env.base_env
        state = base.get_state_dict()
        index = torch.as_tensor(source, device=base.device)
        base.set_state_dict(_index_tree(state, index))
        return self._observation.observation(base.get_obs())

    def step(self, actions: torch.Tensor):
        """actions (N, A) -> obs, reward (N,), terminated (N,), truncated (N,), info: "success", "success_once",
        "reset_mask", "final_obs" and, where the task reports them, "grasped" and "consecutive_grasp" ((N,) bool)."""
        actions = torch.as_tensor(actions, dtype=torch.float32).clamp(self.action_low, self.action_high)
        if self.gpu:
            obs, env_reward, terminated, truncated, raw_info = self.env.step(actions.to(self.env.device))
        else:
            obs, env_reward, terminated, truncated, raw_info = self._cpu_step(actions.numpy())
            for i, action in enumerate(actions.numpy()):
                self._actions[i].append(action.copy())
        info = self._step_info(raw_info)
        reward = torch.as_tensor(env_reward).cpu().float()
        terminated, truncated = torch.as_tensor(terminated).cpu().bool(), torch.as_tensor(truncated).cpu().bool()
        if self.ignore_terminations:
            terminated = torch.zeros_like(terminated)  # the episode goes on after success, up to its time limit
        self.success_once |= info["success"]
        info["success_once"] = self.success_once.clone()
        obs = self._to_cpu(obs)
        done = terminated | truncated
        info["final_obs"] = obs
        info["reset_mask"] = done
        if done.any():
            obs = self._reset_done(done, obs)
        return obs, reward, terminated, truncated, info

    def _reset_done(self, done: torch.Tensor, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.success_once[done] = False
        if self.gpu:
            new_obs, _ = self.env.reset(options=dict(env_idx=torch.nonzero(done).flatten().to(self.env.device)))
        else:
            for i in torch.nonzero(done).flatten().tolist():
                self._seeds[i], self._actions[i] = next_episode_seed(self._seeds[i]), []
            new_obs = self._cpu_reset(self._seeds, done.numpy())
        self._refresh_instructions(done)
        new_obs = self._to_cpu(new_obs)
        return {k: torch.where(done.view(-1, *[1] * (v.dim() - 1)), new_obs[k], v) for k, v in obs.items()}

    def close(self) -> None:
        if self.gpu:
            self.env.close()
            return
        try:
            self.env.close(timeout=30)  # a worker that does not answer within 30 s is terminated
        except WORKER_DEATH:  # a dead worker cannot answer "close"
            self._kill_workers()


def _index_tree(tree, index):
    if isinstance(tree, dict):
        return {k: _index_tree(v, index) for k, v in tree.items()}
    return tree[index]
