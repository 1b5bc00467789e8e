"""The Ray layer: rollout workers as restartable actors, weight sync through the object store, and a coordinator
that drives a collection job to an exact episode target even when workers die.

Workers commit episodes themselves (one transaction each), so the experience store is the source of truth:
after any failure the coordinator recounts what is committed and hands out only what is still missing, which is
what makes the job end with exactly the target — none lost, none duplicated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm.auto import tqdm

from actors.inference import BatchingInferenceServer, ServedPolicy
from actors.rollout import RolloutStats, RolloutWorker
from policies.base import Policy
from policies.rtc import supports_inpainting

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one (idempotent)."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)


def start_inference_server(
    policy: Policy, max_batch: int = 64, max_wait_ms: float = 2.0
) -> tuple[Any, ServedPolicy]:
    """Start a batching inference actor for ``policy``; returns the actor and the ``Policy`` workers should hold."""
    server = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(BatchingInferenceServer).remote(
        policy, max_batch=max_batch, max_wait_ms=max_wait_ms
    )
    served = ServedPolicy(
        server, policy.action_horizon, policy.action_dim, policy.version, supports_inpainting(policy)
    )
    return server, served


@dataclass
class CollectionResult:
    """Outcome of a collection job."""

    committed: int
    stats: RolloutStats
    worker_failures: int = 0
    errors: list[str] = field(default_factory=list)


class RolloutCluster:
    """A group of remote ``RolloutWorker`` actors built from the same keyword arguments but their worker id.

    ``worker_kwargs`` are ``RolloutWorker`` constructor arguments (env factories, policy, sink, task, …);
    they are pickled to each actor, and a restarted actor is rebuilt from them, then given the latest policy.
    """

    def __init__(
        self,
        num_workers: int,
        worker_kwargs: dict[str, Any],
        *,
        max_restarts: int = 3,
        cpus_per_worker: float = 1.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1, got {num_workers}")
        actor_class = ray.remote(num_cpus=cpus_per_worker, max_restarts=max_restarts, max_task_retries=0)(
            RolloutWorker
        )
        self.workers = [actor_class.remote(**worker_kwargs, worker_id=index) for index in range(num_workers)]
        self._latest_policy: ray.ObjectRef | None = None

    def publish_policy(self, policy: Policy) -> None:
        """Put the policy in the object store once and point every worker at it (applied between chunks)."""
        self._latest_policy = ray.put(policy)
        ray.get([worker.set_policy.remote(self._latest_policy) for worker in self.workers])

    def pids(self) -> list[int]:
        """Process ids of the worker actors (for fault-injection tests)."""
        return ray.get([worker.pid.remote() for worker in self.workers])

    def collect(
        self,
        target_episodes: int,
        count_committed: Callable[[], int],
        *,
        episodes_per_call: int = 1,
        progress: bool = True,
        max_failures: int = 20,
    ) -> CollectionResult:
        """Run until ``count_committed()`` reaches ``target_episodes``, re-dispatching work lost to dead workers."""
        committed = count_committed()
        stats, failures, errors = RolloutStats(), 0, []
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}
        live = set(range(len(self.workers)))
        bar = tqdm(total=target_episodes, initial=committed, desc="episodes", unit="ep", disable=not progress)
        while committed < target_episodes:
            self._dispatch(in_flight, live, target_episodes - committed, episodes_per_call)
            if not in_flight:
                raise RuntimeError(
                    f"collection stopped at {committed}/{target_episodes}: every worker is dead"
                )
            done, _ = ray.wait(list(in_flight), num_returns=1)
            worker_index, _ = in_flight.pop(done[0])
            try:
                stats = stats.merge(ray.get(done[0]))
            except (RayActorError, RayTaskError) as error:
                failures += 1
                errors.append(f"worker {worker_index}: {error.__class__.__name__}")
                logger.warning("rollout worker %d failed (%s); re-dispatching its work", worker_index, error)
                if failures > max_failures:
                    raise RuntimeError(f"collection gave up after {failures} worker failures") from error
                self._restore(worker_index, live)
            committed = count_committed()
            bar.update(committed - bar.n)
        bar.close()
        return CollectionResult(committed=committed, stats=stats, worker_failures=failures, errors=errors)

    def _dispatch(
        self,
        in_flight: dict[ray.ObjectRef, tuple[int, int]],
        live: set[int],
        missing: int,
        episodes_per_call: int,
    ) -> None:
        """Give every idle live worker a share of what is missing, never more than is missing in total."""
        busy = {index for index, _ in in_flight.values()}
        budget = missing - sum(count for _, count in in_flight.values())
        for index in sorted(live - busy):
            if budget <= 0:
                return
            count = min(episodes_per_call, budget)
            in_flight[self.workers[index].run.remote(episodes=count)] = (index, count)
            budget -= count

    def _restore(self, worker_index: int, live: set[int]) -> None:
        """After a failure: give a restarted worker the latest policy, or drop it if it stays dead."""
        worker = self.workers[worker_index]
        try:
            ray.get(worker.pid.remote(), timeout=120)
            if self._latest_policy is not None:
                ray.get(worker.set_policy.remote(self._latest_policy))
        except (RayActorError, ray.exceptions.GetTimeoutError):
            logger.warning("rollout worker %d is gone for good", worker_index)
            live.discard(worker_index)

    def shutdown(self) -> None:
        """Kill every worker actor."""
        for worker in self.workers:
            ray.kill(worker)
