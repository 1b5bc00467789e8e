"""The hardware abstraction the robot runtime (``actors.robot_runtime``) drives, and a Meta-World robot behind it.

``RobotInterface`` is what a real arm's driver implements: ``reset`` (go to a start pose, return the first
observation), ``observe`` (the latest sensor reading), ``act`` (send one command and return what the robot
reports for it), ``e_stop`` (stop at once; every later ``act`` raises ``EStopError`` until ``reset``) and
``close``. Observations are flywheel ``Observation`` dicts (``images``, ``state``, ``prompt``; simulated robots
add ``privileged``).

``SimRobot`` is a Meta-World task behind that interface; ``RobotProcess`` runs any robot (``SimRobot`` by
default) in its own process and forwards the calls over a pipe, as a robot driver runs apart from the
runtime. ``e_stop`` on a ``RobotProcess`` takes effect locally before the message is even sent.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from core.types import Observation

if TYPE_CHECKING:
    from envs.metaworld_env import EnvConfig


class EStopError(RuntimeError):
    """The robot is emergency-stopped: it refuses commands until it is reset."""


@dataclass(frozen=True)
class StepFeedback:
    """What the robot reports after executing a command (a real robot reports reward 0 and no success)."""

    reward: float = 0.0
    success: bool = False
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RobotInterface(Protocol):
    """A robot the runtime can drive at a fixed rate."""

    action_dim: int

    def reset(self, seed: int | None = None) -> Observation:
        """Move to a start configuration; return the first observation."""
        ...

    def observe(self) -> Observation:
        """The latest observation."""
        ...

    def act(self, action: np.ndarray) -> StepFeedback:
        """Execute one command (``action_dim`` floats); raise ``EStopError`` when stopped."""
        ...

    def e_stop(self) -> None:
        """Stop immediately; every later ``act`` raises ``EStopError`` until ``reset``."""
        ...

    def close(self) -> None:
        """Release the hardware (or simulator)."""
        ...


class SimRobot:
    """A Meta-World task as a robot: ``act`` steps the simulator, ``observe`` returns the latest observation.

    Meta-World (mujoco) is imported here, when a sim robot is built: the module stays light for real robots.
    """

    def __init__(self, config: EnvConfig | None = None) -> None:
        from envs.metaworld_env import ACTION_DIM, EnvConfig, MetaWorldEnv

        self.action_dim = ACTION_DIM
        self.config = config or EnvConfig(render=False)
        self.env = MetaWorldEnv(self.config)
        self._observation: Observation | None = None
        self._stopped = threading.Event()
        self.steps = 0

    def reset(self, seed: int | None = None) -> Observation:
        """Reset the scene (``seed`` fixes objects and goal) and clear an e-stop."""
        self._observation, _ = self.env.reset(seed=seed)
        self._stopped.clear()
        self.steps = 0
        return self._observation

    def observe(self) -> Observation:
        """The observation after the last command (or reset)."""
        if self._observation is None:
            raise RuntimeError("observe() called before reset()")
        return self._observation

    def act(self, action: np.ndarray) -> StepFeedback:
        """Step the simulator with ``action``."""
        if self._stopped.is_set():
            raise EStopError("robot is e-stopped; reset() to resume")
        observation, reward, terminated, truncated, info = self.env.step(np.asarray(action, np.float32))
        self._observation = observation
        self.steps += 1
        return StepFeedback(float(reward), bool(info["success"]), terminated, truncated, {})

    def e_stop(self) -> None:
        """Refuse every further command until ``reset``."""
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        """Whether the robot is e-stopped."""
        return self._stopped.is_set()

    def close(self) -> None:
        """Free the simulator."""
        self.env.close()


def _serve_robot(factory: Callable[[], RobotInterface], pipe: Any) -> None:
    """Child process: build the robot, then answer ``(method, args)`` messages until ``close``."""
    robot = factory()
    pipe.send(("ready", robot.action_dim))
    while True:
        try:
            method, args = pipe.recv()
        except EOFError:  # the runtime died (e.g. SIGKILL): release the robot and exit
            robot.e_stop()
            robot.close()
            return
        try:
            result = getattr(robot, method)(*args)
            if method == "act":
                result = (result, robot.observe())
            pipe.send(("ok", result))
        except Exception as error:  # forwarded to the caller, who re-raises it
            pipe.send(("error", error))
        if method == "close":
            return


def sim_robot_factory(config: EnvConfig) -> Callable[[], RobotInterface]:
    """A picklable factory of ``SimRobot(config)`` for ``RobotProcess``."""
    return _SimRobotFactory(config)


@dataclass(frozen=True)
class _SimRobotFactory:
    config: EnvConfig

    def __call__(self) -> RobotInterface:
        return SimRobot(self.config)


class RobotProcess:
    """Any robot in its own process (spawned), driven over a pipe; same interface as the robot itself."""

    def __init__(self, factory: Callable[[], RobotInterface], start_timeout_s: float = 60.0) -> None:
        context = mp.get_context("spawn")
        self._pipe, child = context.Pipe()
        self.process = context.Process(target=_serve_robot, args=(factory, child), daemon=True)
        self.process.start()
        if not self._pipe.poll(start_timeout_s):
            self.process.kill()
            raise TimeoutError(f"robot process did not start within {start_timeout_s} s")
        _, self.action_dim = self._pipe.recv()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._observation: Observation | None = None

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            self._pipe.send((method, args))
            status, result = self._pipe.recv()
        if status == "error":
            raise result
        return result

    def reset(self, seed: int | None = None) -> Observation:
        """Reset the remote robot (clears an e-stop)."""
        self._observation = self._call("reset", seed)
        self._stopped.clear()
        return self._observation

    def observe(self) -> Observation:
        """The observation returned with the last command (no round trip)."""
        if self._observation is None:
            self._observation = self._call("observe")
        return self._observation

    def act(self, action: np.ndarray) -> StepFeedback:
        """Send one command; raises ``EStopError`` at once if e-stopped here or in the robot process."""
        if self._stopped.is_set():
            raise EStopError("robot is e-stopped; reset() to resume")
        feedback, self._observation = self._call("act", np.asarray(action, np.float32))
        return feedback

    def e_stop(self) -> None:
        """Refuse further commands locally at once, then stop the robot process's robot."""
        self._stopped.set()
        self._call("e_stop")

    def close(self) -> None:
        """Close the robot and join its process."""
        if self.process.is_alive():
            self._call("close")
            self.process.join(timeout=10)
