"""Scripted experts for the ManiSkill3 cube tasks: privileged state in, a `pd_ee_delta_pose` action out.

    expert = EXPERTS["PickCube-v1"]()
    expert.reset()                                   # once per episode
    action = expert.act(env.unwrapped)               # (7,) float32 in [-1, 1]

They read poses from the unwrapped env (one env, `num_envs=1`; names from mani_skill/envs/tasks/tabletop/*.py):
`agent.tcp.pose`, the cubes (`obj`, `cube`, `cubeA`/`cubeB`) and the goals (`goal_region`, `goal_site`).

The action follows the Panda's `pd_ee_delta_pose` controller (mani_skill/agents/robots/panda/panda.py and
agents/controllers/pd_ee_pose.py): dims 0-2 move the TCP by up to 0.1 m along the robot root's axes (the root sits
at x=-0.615 with no rotation, so these are the world axes), dims 3-5 rotate it by up to 0.1 rad (XYZ Euler angles,
root-aligned), dim 6 is the gripper (1 open, -1 closed). mani_skill 3.0.1 scales the rotation by `rot_lower` (-0.1)
in `PDEEPoseController._clip_and_scale_action`, so a positive rotation command turns the TCP the negative way about
the root axis, hence `ROTATION_SIGN`. Each step the controller solves IK for the current pose plus
the delta; the PD drive covers about 40% of a 0.05 m step within the step, and translation commands near 1.0 make the
CPU sim's IK fail (the arm then holds still), so moves are proportional and clipped to `MAX_ACTION`. The IK also fails
near the edge of the workspace (far +x, low), which is where the remaining failures are.

Each expert is a small phase machine (reach, descend, grasp, carry, ...); phases advance on distance thresholds.
bench/expert_success.py measures their success rates.
"""

import numpy as np

MAX_ACTION = np.array([0.6, 0.6, 0.6, 1.0, 1.0, 1.0])  # per-dim clip of the translation and rotation commands
GAIN = 2.0  # proportional gain: command = GAIN * error / 0.1 m (the controller scale)
ROTATION_SIGN = -1.0  # a command of +r targets a turn of -0.1 r rad about the root axis
OPEN, CLOSED = 1.0, -1.0


def _position(actor) -> np.ndarray:
    return actor.pose.p[0].cpu().numpy().astype(np.float64)


def _yaw(actor) -> float:
    """Angle of the actor's x axis in the world xy plane."""
    rotation = actor.pose.to_transformation_matrix()[0, :3, :3].cpu().numpy()
    return float(np.arctan2(rotation[1, 0], rotation[0, 0]))


def _square_yaw_error(target_yaw: float, yaw: float) -> float:
    """Smallest rotation about z taking `yaw` onto `target_yaw` for a square (90 degree symmetric) object."""
    return float((target_yaw - yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)


class Expert:
    """Phase bookkeeping and the proportional move shared by all experts."""

    def reset(self) -> None:
        self.phase, self.phase_steps = 0, 0

    def next_phase(self) -> None:
        self.phase, self.phase_steps = self.phase + 1, 0

    def act(self, env) -> np.ndarray:
        action = self.policy(env)
        self.phase_steps += 1
        return action

    def policy(self, env) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def move(env, target: np.ndarray, gripper: float, yaw_error: float = 0.0) -> np.ndarray:
        """Action (7,) driving the TCP towards `target` (world xyz) and its yaw by `yaw_error` radians."""
        delta = np.zeros(6)
        delta[:3] = target - _position(env.agent.tcp)
        delta[5] = ROTATION_SIGN * yaw_error
        command = np.clip(GAIN * delta / 0.1, -MAX_ACTION, MAX_ACTION)
        return np.append(command, gripper).astype(np.float32)

    @staticmethod
    def near(env, target: np.ndarray, tolerance: float) -> bool:
        return bool(np.linalg.norm(_position(env.agent.tcp) - target) < tolerance)


class PushCubeExpert(Expert):
    """Closed gripper behind the cube (-x side), at table height, then push along +x towards the goal."""

    behind = np.array([-0.05, 0.0, 0.0])

    def cube_and_goal(self, env):
        return _position(env.obj), _position(env.goal_region)

    def policy(self, env) -> np.ndarray:
        cube, goal = self.cube_and_goal(env)
        start = cube + self.behind
        start[2] = 0.015
        if self.phase == 0:  # above the start point
            target = start + [0, 0, 0.05]
            if self.near(env, target, 0.015):
                self.next_phase()
        if self.phase == 1:  # down to the table
            target = start
            if self.near(env, target, 0.01):
                self.next_phase()
        if self.phase == 2:  # push: the TCP stays behind the cube while the cube goes to the goal
            target = np.array([goal[0], cube[1], 0.015]) + self.behind * 0.8
        return self.move(env, target, CLOSED)


class PullCubeExpert(PushCubeExpert):
    """Closed gripper beyond the cube (+x side), at table height, then pull along -x towards the goal."""

    behind = np.array([0.05, 0.0, 0.0])


class PickCubeExpert(Expert):
    """Above the cube with the fingers aligned to its faces, down, grasp, carry to the goal and hold still."""

    def cube_and_goal(self, env):
        return env.cube, _position(env.goal_site)

    def policy(self, env) -> np.ndarray:
        cube_actor, goal = self.cube_and_goal(env)
        cube = _position(cube_actor)
        yaw_error = _square_yaw_error(_yaw(cube_actor), _yaw(env.agent.tcp))
        if self.phase == 0:  # above the cube, fingers turned to its faces
            target = cube + [0, 0, 0.06]
            if self.near(env, target, 0.015) and abs(yaw_error) < 0.2:
                self.next_phase()
            return self.move(env, target, OPEN, yaw_error)
        if self.phase == 1:  # down around the cube
            if self.near(env, cube, 0.008):
                self.next_phase()
            return self.move(env, cube, OPEN, yaw_error)
        if self.phase == 2:  # close the fingers
            if self.phase_steps >= 3:
                self.next_phase()
            return self.move(env, cube, CLOSED)
        held_offset = _position(env.agent.tcp) - cube  # carry the cube, not the TCP, to the goal
        return self.place(env, goal + held_offset)

    def place(self, env, goal: np.ndarray) -> np.ndarray:
        """Move the TCP to `goal` (where the held cube reaches the task's goal)."""
        return self.move(env, goal, CLOSED)


class StackCubeExpert(PickCubeExpert):
    """PickCube's grasp of cube A, then over cube B, down onto it, open the fingers and back off upwards."""

    def cube_and_goal(self, env):
        return env.cubeA, _position(env.cubeB) + [0, 0, 0.04]

    def place(self, env, goal: np.ndarray) -> np.ndarray:
        if self.phase == 3:  # lift and go just over cube B (higher targets are out of reach when B is far out)
            target = goal + [0, 0, 0.01]
            if self.near(env, target, 0.01):
                self.next_phase()
            return self.move(env, target, CLOSED)
        if self.phase == 4:  # put it down on cube B
            if self.near(env, goal, 0.005) or self.phase_steps >= 6:
                self.next_phase()
            return self.move(env, goal, CLOSED)
        if self.phase == 5:  # let go
            if self.phase_steps >= 3:
                self.next_phase()
            return self.move(env, goal, OPEN)
        return self.move(env, goal + [0, 0, 0.05], OPEN)


EXPERTS = {
    "PushCube-v1": PushCubeExpert,
    "PullCube-v1": PullCubeExpert,
    "PickCube-v1": PickCubeExpert,
    "StackCube-v1": StackCubeExpert,
}
