"""Task definitions (rewards, episode initialisation) of the 11 custom MT30 tasks.

Each task reuses a dm_control suite domain (physics + observation); only the reward and, for
cup-spin, the initial-state distribution differ. Constants are those of the TD-MPC2 tasks.
Builders take the integer seed that becomes the task's `np.random.RandomState` (the same role
as `task_kwargs={'random': seed}` for suite tasks).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from dm_control.rl import control
from dm_control.suite import ball_in_cup, base, cheetah, hopper, pendulum, reacher, walker
from dm_control.utils.rewards import tolerance

from agent.envs.custom import models

INF = float("inf")


# ---------------------------------------------------------------------------------- walker
class BackwardsWalker(walker.PlanarWalker):
    """Walker stand reward times a reward for moving at <= -move_speed (i.e. backwards)."""

    def get_reward(self, physics) -> float:
        standing = tolerance(physics.torso_height(), bounds=(walker._STAND_HEIGHT, INF),
                             margin=walker._STAND_HEIGHT / 2)
        upright = (1 + physics.torso_upright()) / 2
        stand = (3 * standing + upright) / 4
        backwards = tolerance(physics.horizontal_velocity(), bounds=(-INF, -self._move_speed),
                              margin=self._move_speed / 2, value_at_margin=0.5, sigmoid="linear")
        return stand * (5 * backwards + 1) / 6


def _walker_backwards(speed: float) -> Callable[[int], control.Environment]:
    def build(seed: int) -> control.Environment:
        physics = walker.Physics.from_xml_string(*models.walker_model())
        return control.Environment(physics, BackwardsWalker(move_speed=speed, random=seed),
                                   time_limit=walker._DEFAULT_TIME_LIMIT,
                                   control_timestep=walker._CONTROL_TIMESTEP)
    return build


# --------------------------------------------------------------------------------- cheetah
_CHEETAH_UP_HEIGHT = 1.2


class CheetahRunBackwards(cheetah.Cheetah):
    def __init__(self, speed: float, random=None):
        super().__init__(random=random)
        self._speed = speed

    def get_reward(self, physics) -> float:
        return tolerance(physics.speed(), bounds=(-INF, -self._speed), margin=self._speed,
                         value_at_margin=0, sigmoid="linear")


def _height_up(height: float) -> float:
    return tolerance(height, bounds=(_CHEETAH_UP_HEIGHT, INF), margin=_CHEETAH_UP_HEIGHT / 2)


class CheetahRunOnOneFoot(cheetah.Cheetah):
    """Run forwards at >= speed with the torso and `raised_foot` up high (the other foot on the ground)."""

    def __init__(self, raised_foot: str, speed: float, random=None):
        super().__init__(random=random)
        self._raised_foot = raised_foot
        self._speed = speed

    def get_reward(self, physics) -> float:
        torso_up = _height_up(physics.named.data.xpos["torso", "z"])
        foot_up = _height_up(physics.named.data.xpos[self._raised_foot, "z"])
        up = (3 * foot_up + 2 * torso_up) / 5
        fast = tolerance(physics.speed(), bounds=(self._speed, INF), margin=self._speed,
                         value_at_margin=0, sigmoid="linear")
        return up * (5 * fast + 1) / 6


class CheetahJump(cheetah.Cheetah):
    """Mean of 'stand on the back foot' and 'stand on the front foot', each with |speed| <= max_speed."""

    def __init__(self, max_speed: float, random=None):
        super().__init__(random=random)
        self._max_speed = max_speed

    def _stand_with_raised(self, physics, raised_foot: str) -> float:
        mean_height = (physics.named.data.xpos["torso", "z"] + physics.named.data.xpos[raised_foot, "z"]) / 2
        still = tolerance(physics.speed(), bounds=(-self._max_speed, self._max_speed),
                          margin=self._max_speed, value_at_margin=0, sigmoid="linear")
        return (5 * _height_up(mean_height) + still) / 6

    def get_reward(self, physics) -> float:
        return (self._stand_with_raised(physics, "bfoot") + self._stand_with_raised(physics, "ffoot")) / 2


def _cheetah(make_task: Callable[[int], cheetah.Cheetah]) -> Callable[[int], control.Environment]:
    def build(seed: int) -> control.Environment:
        physics = cheetah.Physics.from_xml_string(*models.cheetah_model())
        return control.Environment(physics, make_task(seed), time_limit=cheetah._DEFAULT_TIME_LIMIT)
    return build


# ---------------------------------------------------------------------------------- hopper
class HopperHopBackwards(hopper.Hopper):
    def __init__(self, random=None):
        super().__init__(hopping=True, random=random)

    def get_reward(self, physics) -> float:
        standing = tolerance(physics.height(), (hopper._STAND_HEIGHT, 2))
        backwards = tolerance(physics.speed(), bounds=(-INF, -hopper._HOP_SPEED / 2),
                              margin=hopper._HOP_SPEED / 4, value_at_margin=0.5, sigmoid="linear")
        return standing * backwards


def _hopper_hop_backwards(seed: int) -> control.Environment:
    physics = hopper.Physics.from_xml_string(*models.hopper_model())
    return control.Environment(physics, HopperHopBackwards(random=seed), time_limit=hopper._DEFAULT_TIME_LIMIT,
                               control_timestep=hopper._CONTROL_TIMESTEP)


# --------------------------------------------------------------------------------- reacher
def _three_link_reacher(target_size: float) -> Callable[[int], control.Environment]:
    def build(seed: int) -> control.Environment:
        physics = reacher.Physics.from_xml_string(*models.three_link_reacher_model())
        return control.Environment(physics, reacher.Reacher(target_size=target_size, random=seed),
                                   time_limit=reacher._DEFAULT_TIME_LIMIT)
    return build


# ----------------------------------------------------------------------------- ball in cup
_SPIN_MIN_DISTANCE = 0.5
_SPIN_MIN_BALL_SPEED = 6.0
_SPIN_P_START_OUTSIDE = 0.1


class CupSpin(ball_in_cup.BallInCup):
    """Keep the ball out of the cup, far from the target and fast.

    Episodes start with the ball inside the cup, except with probability 0.1 where any
    collision-free position is accepted (drawn once per episode, before the positions).
    """

    def initialize_episode(self, physics) -> None:
        may_start_outside = self.random.uniform() < _SPIN_P_START_OUTSIDE
        while True:
            physics.named.data.qpos["ball_x"] = self.random.uniform(-.2, .2)
            physics.named.data.qpos["ball_z"] = self.random.uniform(.2, .5)
            physics.after_reset()
            collision_free = physics.data.ncon == 0
            if collision_free and (may_start_outside or bool(physics.in_target())):
                break
        base.Task.initialize_episode(self, physics)  # skip BallInCup's own position sampling

    def get_reward(self, physics) -> float:
        distance = np.linalg.norm(physics.ball_to_target())
        velocity = physics.named.data.qvel
        ball_speed = np.linalg.norm([abs(velocity["ball_x"]), abs(velocity["ball_z"])])
        far = tolerance(distance, bounds=(_SPIN_MIN_DISTANCE, INF), margin=_SPIN_MIN_DISTANCE / 2,
                        value_at_margin=0.5, sigmoid="linear")
        fast = tolerance(ball_speed, bounds=(_SPIN_MIN_BALL_SPEED, INF), margin=_SPIN_MIN_BALL_SPEED / 2,
                         value_at_margin=0.5, sigmoid="linear")
        outside = 1 - physics.in_target()
        return outside * (far + 2 * fast) / 3


def _cup_spin(seed: int) -> control.Environment:
    physics = ball_in_cup.Physics.from_xml_string(*models.ball_in_cup_model())
    return control.Environment(physics, CupSpin(random=seed), time_limit=ball_in_cup._DEFAULT_TIME_LIMIT,
                               control_timestep=ball_in_cup._CONTROL_TIMESTEP)


# -------------------------------------------------------------------------------- pendulum
_PENDULUM_SPIN_SPEED = 9.0


class PendulumSpin(pendulum.SwingUp):
    """Spin the pole at angular speed >= 9 rad/s (swing-up initial states)."""

    def get_reward(self, physics) -> float:
        return tolerance(np.linalg.norm(physics.angular_velocity()), bounds=(_PENDULUM_SPIN_SPEED, INF),
                         margin=_PENDULUM_SPIN_SPEED / 2, value_at_margin=0.5, sigmoid="linear")


def _pendulum_spin(seed: int) -> control.Environment:
    physics = pendulum.Physics.from_xml_string(*models.pendulum_model())
    return control.Environment(physics, PendulumSpin(random=seed), time_limit=pendulum._DEFAULT_TIME_LIMIT)


# ------------------------------------------------------------------------------- registry
_RUN_SPEED_CHEETAH = cheetah._RUN_SPEED  # 10

CUSTOM_TASKS: dict[str, Callable[[int], control.Environment]] = {
    "walker-walk-backwards": _walker_backwards(walker._WALK_SPEED),
    "walker-run-backwards": _walker_backwards(walker._RUN_SPEED),
    "cheetah-run-backwards": _cheetah(lambda seed: CheetahRunBackwards(0.8 * _RUN_SPEED_CHEETAH, random=seed)),
    "cheetah-run-front": _cheetah(lambda seed: CheetahRunOnOneFoot("bfoot", 0.6 * _RUN_SPEED_CHEETAH, random=seed)),
    "cheetah-run-back": _cheetah(lambda seed: CheetahRunOnOneFoot("ffoot", 0.6 * _RUN_SPEED_CHEETAH, random=seed)),
    "cheetah-jump": _cheetah(lambda seed: CheetahJump(max_speed=0.5, random=seed)),
    "hopper-hop-backwards": _hopper_hop_backwards,
    "reacher-three-easy": _three_link_reacher(reacher._BIG_TARGET),
    "reacher-three-hard": _three_link_reacher(reacher._SMALL_TARGET),
    "cup-spin": _cup_spin,
    "pendulum-spin": _pendulum_spin,
}
