"""ManiSkill3 for VLA policies: a batch of envs that returns camera images, instructions and per-step rewards.

GPU machine: one process simulates all envs (`physx_cuda`, GPU rendering).
CPU machine: ManiSkill's CPU backend holds one env per process, so the batch is one subprocess per env
(gymnasium AsyncVectorEnv), rendered by Mesa's lavapipe Vulkan driver (see scripts/setup.sh).
Both paths share this interface:

    env = ManiSkillVLAEnv("PickCube-v1", num_envs=4)
    obs = env.reset(seeds=[0, 1, 2, 3])          # {"rgb": uint8 (N, H, W, 3), "tcp_pose": (N, 7)}
    obs, reward, terminated, truncated, info = env.step(actions)   # actions (N, 7) in [-1, 1]

Finished envs are reset inside `step` (the returned obs is the first one of the new episode) and
`info["final_obs"]` holds the last observation of the finished episode, for bootstrapping truncations.
The reward is the task's own (sparse success, or ManiSkill's normalized dense reward with `dense_reward=True`);
`info` also carries the grasp signal of tasks that report one, so a script can shape its own reward from it.
"""

from typing import Optional

import gymnasium as gym
import numpy as np
import torch

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
    "PushT-v1": "push the T-shaped block onto the target",
}
GRASP_KEYS = ("is_src_obj_grasped", "is_grasped")  # Bridge tasks, ManiSkill tasks: reported as info["grasped"]


def registered_env_ids() -> list[str]:
    import mani_skill.envs  # noqa: F401  (registers the tasks)
    from mani_skill.utils.registration import REGISTERED_ENVS

    return sorted(REGISTERED_ENVS)


def check_env_id(env_id: str) -> None:
    """Fail fast (before any simulator starts) on an unknown task or one without an instruction."""
    registered = registered_env_ids()
    if env_id not in registered:
        raise ValueError(
            f"--env-id {env_id!r} is not a ManiSkill3 task. Tasks with built-in instructions (no asset download): "
            f"{', '.join(INSTRUCTIONS)}. All registered ids: {', '.join(registered)}."
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
    """Keep only what a VLA needs: the first camera's RGB image and the end-effector pose."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.unwrapped.single_observation_space
        camera = next(iter(space["sensor_data"].values()))
        self.observation_space = gym.spaces.Dict({"rgb": camera["rgb"], "tcp_pose": space["extra"]["tcp_pose"]})

    def observation(self, obs):
        camera = next(iter(obs["sensor_data"].values()))
        return {"rgb": camera["rgb"], "tcp_pose": obs["extra"]["tcp_pose"]}


def _make_single_cpu_env(env_id: str, make_kwargs: dict):
    def thunk():
        import mani_skill.envs  # noqa: F401  (runs in the worker process)
        from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

        torch.set_num_threads(1)  # one core per env process; the policy process keeps the rest
        env = gym.make(env_id, num_envs=1, sim_backend="physx_cpu", **make_kwargs)
        instruction = getattr(env.unwrapped, "get_language_instruction", None)
        env = _VLAObservation(CPUGymWrapper(env))  # numpy in and out, batch dim of 1 removed
        env.language_instruction = instruction()[0] if instruction else None
        return env

    return thunk


class ManiSkillVLAEnv:
    def __init__(
        self,
        env_id: str,
        num_envs: int,
        image_size: Optional[int] = 224,
        dense_reward: bool = False,
        instruction: Optional[str] = None,
        max_episode_steps: Optional[int] = None,
        control_mode: str = "pd_ee_delta_pose",
        sim_backend: str = "auto",
    ):
        check_env_id(env_id)
        check_render_device()
        import mani_skill.envs  # noqa: F401

        self.env_id, self.num_envs = env_id, num_envs
        self.gpu = sim_backend == "gpu" or (sim_backend == "auto" and torch.cuda.is_available())
        make_kwargs = dict(
            obs_mode="rgb",
            control_mode=control_mode,
            reward_mode="normalized_dense" if dense_reward else "sparse",
            render_mode="rgb_array",
        )
        if image_size:
            make_kwargs["sensor_configs"] = dict(width=image_size, height=image_size)
        if max_episode_steps:
            make_kwargs["max_episode_steps"] = max_episode_steps

        if self.gpu:
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

            base = gym.make(env_id, num_envs=num_envs, sim_backend="physx_cuda", **make_kwargs)
            get_instruction = getattr(base.unwrapped, "get_language_instruction", None)
            self._observation = _VLAObservation(base)
            self.env = ManiSkillVectorEnv(self._observation, auto_reset=False, ignore_terminations=False)
            env_instructions = get_instruction() if get_instruction else [None] * num_envs
        else:
            self.env = gym.vector.AsyncVectorEnv(
                [_make_single_cpu_env(env_id, make_kwargs) for _ in range(num_envs)],
                autoreset_mode=gym.vector.AutoresetMode.DISABLED,
                context="forkserver",
            )
            env_instructions = self.env.get_attr("language_instruction")
        self.max_episode_steps = max_episode_steps or gym.spec(env_id).max_episode_steps
        self.action_low = torch.as_tensor(self.env.single_action_space.low, dtype=torch.float32)
        self.action_high = torch.as_tensor(self.env.single_action_space.high, dtype=torch.float32)

        default = instruction or INSTRUCTIONS.get(env_id)
        self.instructions = [instruction or text or default for text in env_instructions]
        if any(text is None for text in self.instructions):
            raise ValueError(f"--env-id {env_id} has no built-in instruction: pass --instruction 'what to do'.")

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
        """Reset every env; envs given the same seed start from the same initial state (GRPO groups)."""
        assert len(seeds) == self.num_envs, f"need one seed per env ({self.num_envs}), got {len(seeds)}"
        obs, _ = self.env.reset(seed=list(seeds))
        if self.gpu:
            obs = self._share_initial_states(seeds, obs)
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
        """actions (N, 7) -> obs, reward (N,), terminated (N,), truncated (N,), info: "success", "final_obs" and, where
        the task reports them, "grasped" and "consecutive_grasp" (all (N,) bool)."""
        actions = torch.as_tensor(actions, dtype=torch.float32).clamp(self.action_low, self.action_high)
        obs, env_reward, terminated, truncated, raw_info = self.env.step(actions.to(self.env.device) if self.gpu else actions.numpy())
        info = self._step_info(raw_info)
        reward = torch.as_tensor(env_reward).cpu().float()
        terminated, truncated = torch.as_tensor(terminated).cpu().bool(), torch.as_tensor(truncated).cpu().bool()
        obs = self._to_cpu(obs)
        done = terminated | truncated
        info["final_obs"] = obs
        if done.any():
            obs = self._reset_done(done, obs)
        return obs, reward, terminated, truncated, info

    def _reset_done(self, done: torch.Tensor, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.gpu:
            new_obs, _ = self.env.reset(options=dict(env_idx=torch.nonzero(done).flatten().to(self.env.device)))
        else:
            new_obs, _ = self.env.reset(options={"reset_mask": done.numpy()})
        new_obs = self._to_cpu(new_obs)
        return {k: torch.where(done.view(-1, *[1] * (v.dim() - 1)), new_obs[k], v) for k, v in obs.items()}

    def close(self) -> None:
        self.env.close()


def _index_tree(tree, index):
    if isinstance(tree, dict):
        return {k: _index_tree(v, index) for k, v in tree.items()}
    return tree[index]
