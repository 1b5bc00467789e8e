"""The Ray layer: rollout workers as restartable actors, weight sync through the object store, and a coordinator
that drives a collection job to a target (exact in episodes, at least in env steps) even when workers die.

Workers commit episodes themselves (one transaction each), so the experience store is the source of truth:
after any failure the coordinator recounts what is committed and hands out only what is still missing, which is
what makes the job end with exactly the target — none lost, none duplicated.

A worker that dies (killed, out of memory, node lost) is restarted and its share handed out again; a worker
whose code raises is not: the same inputs would raise again, so the job stops and raises ``WorkerError`` naming
the worker and the original exception (type and message; the worker-side traceback rides along). Worker
exceptions cross to the driver as ``WorkerError`` because Ray pickles them, and many are not picklable (an
``EGLError`` holds ctypes pointers): Ray would turn such an exception into a worker crash.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from actors.errors import ClusterConnectionError, WorkerError
from actors.inference import BatchingInferenceServer, ServedPolicy
from actors.rollout import RolloutStats, RolloutWorker, TargetUnit, target_progress_bar
from policies.base import Policy
from policies.rtc import supports_inpainting

logger = logging.getLogger(__name__)

WorkerDeathPolicy = Literal["discard", "record"]

#: Ray Client's proxy starts one server process per driver; now and then (seen ~1 in 8 attaches on a loaded
#: machine, with and without a runtime env) that process dies at start-up ("Starting Ray client server
#: failed"). A new attach gets a new process, so ``ensure_ray`` tries that many times.
_CLIENT_ATTEMPTS = 3
_CLIENT_SERVER_FAILED = "Starting Ray client server failed"


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to the Ray cluster at ``address`` (else ``$RAY_ADDRESS``), or start a local one (idempotent).

    ``address`` is a head's GCS address (``head:6390``), ``auto`` (the cluster this machine is a node of) or a
    Ray Client address (``ray://head:10001``). The driver's ``MUJOCO_GL`` goes to every worker through the
    job's runtime env; through Ray Client the job gets none (the client server would first build it with the
    head's runtime-env agent, one more process and port between the driver and the cluster), and the actors
    flywheel starts carry it instead (:func:`actor_runtime_env`). A failed attach is
    :class:`ClusterConnectionError`.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(num_cpus=num_cpus, runtime_env=_job_env(), include_dashboard=False, log_to_driver=False)
        return
    _attach(address)


def _attach(address: str) -> None:
    client = address.startswith("ray://")
    attempts = _CLIENT_ATTEMPTS if client else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, runtime_env=None if client else _job_env(), log_to_driver=False)
            return
        except ConnectionError as error:
            if attempt < attempts and _CLIENT_SERVER_FAILED in str(error):
                logger.warning("Ray Client server at %s failed to start (try %d); retrying", address, attempt)
                continue
            port = "Ray Client's, ray start --ray-client-server-port" if client else "the GCS port"
            raise ClusterConnectionError(
                f"cannot attach to the Ray cluster at {address}: {error}. Check that the head is up and its"
                f" port reachable ({port}); a head with token auth (Ray's default for new clusters) needs"
                " RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token as on the head) in"
                " the driver's environment"
            ) from error


def _job_env() -> dict[str, Any]:
    """The runtime env flywheel's Ray workers need from the driver: its ``MUJOCO_GL`` (EGL unless set)."""
    return {"env_vars": {"MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}}


def actor_runtime_env() -> dict[str, Any] | None:
    """The runtime env to give the actors flywheel starts: the job's env when attached through Ray Client (the
    job has none there, see :func:`ensure_ray`), else None (the job's applies)."""
    from ray.util.client import ray as client_ray

    return _job_env() if client_ray.is_connected() else None


def start_inference_server(
    policy: Policy, max_batch: int = 64, max_wait_ms: float = 2.0, device: str = "cpu"
) -> tuple[Any, ServedPolicy]:
    """Start a batching inference actor for ``policy``; returns the actor and the ``Policy`` workers should hold.

    ``device`` is where the actor runs the model (``cuda``/``auto`` reserve one of the cluster's GPUs for it when
    it has any; ``auto`` on a cluster without GPUs is the CPU).
    """
    wants_gpu = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    server = ray.remote(
        num_cpus=0,
        num_gpus=1 if wants_gpu else 0,
        max_restarts=3,
        max_task_retries=3,
        runtime_env=actor_runtime_env(),
    )(BatchingInferenceServer).remote(policy, max_batch=max_batch, max_wait_ms=max_wait_ms, device=device)
    served = ServedPolicy(
        server, policy.action_horizon, policy.action_dim, policy.version, supports_inpainting(policy)
    )
    return server, served


class _RayRolloutWorker(RolloutWorker):
    """``RolloutWorker`` as the cluster runs it: what its constructor or ``run`` raises leaves ``run`` as
    ``WorkerError``.

    A constructor's exception is kept and raised by every ``run`` call: Ray reports an exception raised in an
    actor's constructor as text only (and does not restart the actor), so the driver could not name it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._startup_error: WorkerError | None = None
        try:
            super().__init__(*args, **kwargs)
        except Exception as error:
            self._startup_error = WorkerError.from_exception(error)

    def run(self, **kwargs: Any) -> RolloutStats:
        """``RolloutWorker.run``; an exception it (or the constructor) raised is raised as ``WorkerError``."""
        self._check_started()
        try:
            return super().run(**kwargs)
        except Exception as error:
            raise WorkerError.from_exception(error) from None

    def set_policy(self, policy: Policy) -> None:
        """``RolloutWorker.set_policy`` (raises the constructor's ``WorkerError`` if it failed)."""
        self._check_started()
        super().set_policy(policy)

    def close(self, timeout_s: float = 20.0) -> None:
        """``RolloutWorker.close`` (nothing to close if the constructor failed)."""
        if self._startup_error is None:
            super().close(timeout_s)

    def _check_started(self) -> None:
        if self._startup_error is not None:
            raise self._startup_error


def rollout_actor(cpus_per_worker: float = 1.0, max_restarts: int = 3) -> Any:
    """The Ray actor class a rollout worker runs as: restartable, two threads (``set_policy`` and ``close`` reach
    a worker during ``run``), exceptions raised as ``WorkerError``. Build one with ``.remote(**worker_kwargs)``."""
    return ray.remote(
        num_cpus=cpus_per_worker,
        max_restarts=max_restarts,
        max_task_retries=0,
        max_concurrency=2,
        runtime_env=actor_runtime_env(),
    )(_RayRolloutWorker)


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
    Each actor runs two threads, so a policy published while a ``run`` call is going reaches the worker at
    once (and takes effect at each env's next chunk).

    ``on_worker_death`` says what happens to the episodes a killed worker had open: ``discard`` (they are
    lost) or ``record`` (each worker journals its open episodes at every chunk boundary under ``journal_dir``,
    default a fresh temporary directory removed by ``shutdown``; the restarted worker commits them as ``error`` episodes, truncated at
    the last journaled step, and they count toward the target like any committed episode). The journal is a
    local file: a worker restarted on another node, or not restarted at all, cannot recover it.
    """

    def __init__(
        self,
        num_workers: int,
        worker_kwargs: dict[str, Any],
        *,
        max_restarts: int = 3,
        cpus_per_worker: float = 1.0,
        on_worker_death: WorkerDeathPolicy = "discard",
        journal_dir: str | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1, got {num_workers}")
        if on_worker_death not in ("discard", "record"):
            raise ValueError(f"on_worker_death must be 'discard' or 'record', got {on_worker_death!r}")
        self._temporary_journal_dir = (
            tempfile.mkdtemp(prefix="flywheel-journal-")
            if on_worker_death == "record" and not journal_dir
            else None
        )
        if on_worker_death == "record":
            worker_kwargs = {**worker_kwargs, "journal_dir": journal_dir or self._temporary_journal_dir}
        actor_class = rollout_actor(cpus_per_worker, max_restarts)
        # held here for the cluster's life: a restarted actor is rebuilt from them (Ray frees constructor arguments
        # it put in the object store itself once the first construction is done, ray-project/ray#53727)
        self._worker_kwargs = {name: ray.put(value) for name, value in worker_kwargs.items()}
        self.workers = [
            actor_class.remote(**self._worker_kwargs, worker_id=index) for index in range(num_workers)
        ]
        self._incarnations = [0] * num_workers  # restarts seen per worker: each gets its own seed stream
        self._latest_policy: ray.ObjectRef | None = None

    def publish_policy(self, policy: Policy) -> None:
        """Put the policy in the object store once and point every worker at it (applied between chunks).

        A worker that is restarting misses the call and gets the policy when the coordinator restores it.
        """
        self._latest_policy = ray.put(policy)
        for worker, reply in [(w, w.set_policy.remote(self._latest_policy)) for w in self.workers]:
            try:
                ray.get(reply)
            except RayActorError as error:
                logger.warning("rollout worker %s did not take the new policy now (%s)", worker, error)

    def pids(self) -> list[int]:
        """Process ids of the worker actors (for fault-injection tests)."""
        return ray.get([worker.pid.remote() for worker in self.workers])

    def collect(
        self,
        target: int,
        count_committed: Callable[[], int],
        *,
        unit: TargetUnit = "episodes",
        episodes_per_call: int = 1,
        env_steps_per_call: int = 256,
        progress: bool = True,
        max_failures: int = 20,
        restart_timeout_s: float = 120.0,
    ) -> CollectionResult:
        """Run until ``count_committed()`` reaches ``target``, re-dispatching work lost to dead workers.

        ``unit`` is what ``target`` and ``count_committed`` count: ``episodes`` (the job ends with exactly
        ``target`` episodes) or ``env_steps`` (steps of committed episodes; episodes are only committed whole, so
        the job ends with at least ``target`` steps, at most about one episode per env more). A dead worker's
        share is held for it while Ray restarts it (up to ``restart_timeout_s``); the others keep working. A
        worker whose code raises ends the job: ``WorkerError`` names the worker and what it raised.
        """
        if unit not in ("episodes", "env_steps"):
            raise ValueError(f"unit must be 'episodes' or 'env_steps', got {unit!r}")
        job = _Job(
            self, unit, episodes_per_call if unit == "episodes" else env_steps_per_call, restart_timeout_s
        )
        committed = count_committed()
        with target_progress_bar(unit, target, committed, progress) as bar:
            while committed < target:
                job.advance(target - committed, committed)
                if job.failures > max_failures:
                    raise RuntimeError(f"collection gave up after {job.failures} worker failures")
                committed = count_committed()
                bar.update(committed - bar.n)
            job.drain()
            bar.update(count_committed() - bar.n)
        return CollectionResult(
            committed=count_committed(), stats=job.stats, worker_failures=job.failures, errors=job.errors
        )

    def restore(self, worker_index: int) -> bool | None:
        """Whether the worker answers again (then it gets the latest policy and a fresh seed stream); None
        while it is restarting."""
        worker = self.workers[worker_index]
        try:
            ray.get(worker.pid.remote(), timeout=10)
            self._incarnations[worker_index] += 1
            ray.get(worker.reseed.remote(self._incarnations[worker_index]), timeout=10)
            if self._latest_policy is not None:
                ray.get(worker.set_policy.remote(self._latest_policy), timeout=10)
        except (ActorUnavailableError, GetTimeoutError):
            return None
        except RayActorError:
            return False
        return True

    def shutdown(self) -> None:
        """Close every worker (its open episodes are abandoned, not recorded), then kill its actor."""
        closing = [worker.close.remote() for worker in self.workers]
        for ref in closing:
            try:
                ray.get(ref, timeout=30)
            except (RayActorError, RayTaskError, GetTimeoutError) as error:
                logger.warning("a rollout worker did not close cleanly (%s)", error)
        for worker in self.workers:
            ray.kill(worker)
        if self._temporary_journal_dir is not None:
            shutil.rmtree(self._temporary_journal_dir, ignore_errors=True)


class _Job:
    """The coordinator's bookkeeping for one ``collect`` call: calls in flight, workers being restored, stats."""

    def __init__(
        self, cluster: RolloutCluster, unit: TargetUnit, per_call: int, restart_timeout_s: float
    ) -> None:
        self.cluster, self.unit, self.per_call = cluster, unit, per_call
        self.restart_timeout_s = restart_timeout_s
        self.in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # call -> (worker, share)
        self.restoring: dict[int, tuple[float, int]] = {}  # worker -> (deadline, share held for it)
        self.live = set(range(len(cluster.workers)))
        self.stats, self.failures, self.errors = RolloutStats(), 0, []

    def advance(self, missing: int, committed: int) -> None:
        """Hand out work, then wait for one call to end (or a short while, when a worker is restarting)."""
        self._poll_restoring()
        self._dispatch(missing)
        if not self.in_flight and not self.restoring:
            raise RuntimeError(f"collection stopped at {committed} {self.unit}: every worker is dead")
        if not self.in_flight:
            time.sleep(0.2)
            return
        done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=0.5 if self.restoring else None)
        for ref in done:
            self._collect_result(ref)

    def drain(self) -> None:
        """Wait for calls still running when the target was reached (so no worker is stepping at shutdown)."""
        for ref in list(self.in_flight):
            self._collect_result(ref)

    def _dispatch(self, missing: int) -> None:
        """Give every idle live worker a share of what is missing, never more than is missing in total."""
        busy = {index for index, _ in self.in_flight.values()} | set(self.restoring)
        held = sum(share for _, share in self.in_flight.values()) + sum(s for _, s in self.restoring.values())
        budget = missing - held
        for index in sorted(self.live - busy):
            if budget <= 0:
                return
            share = min(self.per_call, budget)
            self.in_flight[self.cluster.workers[index].run.remote(**{self.unit: share})] = (index, share)
            budget -= share

    def _collect_result(self, ref: ray.ObjectRef) -> None:
        index, share = self.in_flight.pop(ref)
        try:
            self.stats = self.stats.merge(ray.get(ref))
        except RayTaskError as error:  # the worker's code raised: the same inputs would raise again
            raise _worker_error(error.cause, index) from None
        except RayActorError as error:
            self.failures += 1
            self.errors.append(f"worker {index}: {error.__class__.__name__}")
            logger.warning("rollout worker %d failed (%s); its share waits for its restart", index, error)
            self.restoring[index] = (time.monotonic() + self.restart_timeout_s, share)

    def _poll_restoring(self) -> None:
        """Put restarted workers back to work; give up on those that stay dead (their share goes to others)."""
        for index, (deadline, _) in list(self.restoring.items()):
            answer = self.cluster.restore(index)
            if answer is None and time.monotonic() < deadline:
                continue
            del self.restoring[index]
            if not answer:
                logger.warning("rollout worker %d is gone for good", index)
                self.live.discard(index)


def _worker_error(cause: BaseException, worker: int) -> WorkerError:
    """The ``WorkerError`` the driver raises for ``cause`` (what a worker's call raised), naming the worker."""
    error = WorkerError.from_exception(cause)
    logger.info("rollout worker %d failed; its traceback:\n%s", worker, error.traceback_text)
    return WorkerError(error.type_name, error.message, error.traceback_text, worker)
