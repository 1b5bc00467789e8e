"""A collection job: roll a policy out in an env (optionally with a simulated human) and commit every episode.

In-process with ``workers=0`` (tests, debugging); otherwise on Ray rollout actors, with one batched inference
server or a policy copy per worker. Either way the experience store is where the episodes end up.

A run is resumable and shareable: its id and run seed are recorded in the store when it starts; every episode
claims the run's next never-used index there (``actors.sinks.RunEpisodeIndex``) and is seeded from (run seed,
index) (``actors.rollout.episode_seed``), so a rerun with the same run id, after a kill at any point or in
several processes at once, continues the seed sequence instead of repeating it. An episode target is held in
the store too: a commit that would exceed it is refused (``storage.RunFullError``), so the run ends with
exactly the target however many processes collect it. Indices of episodes that never committed (a killed
process's open episodes, or ones refused at the target) are not reused: a run's indices may have gaps.
"""

from __future__ import annotations

import functools
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.execution import ExecutionConfig
from actors.rollout import RolloutStats, RolloutWorker, TargetUnit, target_progress_bar
from actors.sinks import RunEpisodeIndex, StoreSink
from envs import EnvConfig, GymEnvConfig, InjectionConfig, SimulatedHumanConfig, make_env
from experiments.context import ExpertPhaseLabels
from experiments.policy_loader import load, register, resolve
from experiments.validation import UserError
from policies.base import Policy
from policies.device import DeviceName, place, resolve_device
from storage import ExperienceStore


class CollectConfig(BaseModel):
    """Everything a collection job needs (validated; unknown fields are rejected)."""

    model_config = ConfigDict(extra="forbid")

    env: EnvConfig | GymEnvConfig = Field(
        default=EnvConfig(), description="a Meta-World task (EnvConfig) or any gymnasium env (GymEnvConfig)"
    )
    policy: str = "scripted"
    noise: float = Field(default=0.0, ge=0.0, description="Gaussian action noise of a scripted policy")
    episodes: int | None = Field(default=None, ge=1, description="target in committed episodes (default 10)")
    env_steps: int | None = Field(
        default=None,
        ge=1,
        description="target in committed env steps instead of episodes (at least this many)",
    )
    human: SimulatedHumanConfig | None = None
    inject: InjectionConfig | None = Field(
        default=None, description="bad segments injected into the rollouts (ground truth: steps.injected)"
    )
    workers: int = Field(default=0, ge=0, description="Ray rollout actors; 0 runs in this process")
    envs_per_worker: int = Field(default=1, ge=1)
    inference: Literal["local", "batched"] = "local"
    ray_address: str | None = None
    on_worker_death: Literal["discard", "record"] = Field(
        default="discard", description="a killed Ray worker's open episodes: dropped, or committed as error"
    )
    store_url: str
    run_id: str | None = None
    seed: int | None = Field(
        default=0,
        ge=0,
        description="run seed (episode seeds derive from it and each episode's index in the run); None: the "
        "run's recorded seed, or a fresh random one for a new run",
    )
    record_images: bool = True
    execution: ExecutionConfig = ExecutionConfig()
    subtask_labels: bool = Field(default=False, description="label steps with the scripted expert's phase")
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)
    device: DeviceName = Field(
        default="auto",
        description="where the policy's model infers: this process (workers 0) or the batched inference server "
        "(auto: the accelerator if there is one; Ray workers with local inference infer on the CPU)",
    )

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        resolve_device(value)  # DeviceError (a ValueError): one line naming what is missing
        return value

    @property
    def inference_device(self) -> str:
        """The device the policy infers on (``auto`` resolved); what the run records."""
        return "cpu" if self.workers and self.inference == "local" else str(resolve_device(self.device))

    @model_validator(mode="after")
    def _one_target(self) -> CollectConfig:
        if self.env_steps is not None and self.episodes is not None:
            raise ValueError("give a target in episodes or in env_steps, not both")
        if self.env_steps is None and self.episodes is None:
            self.episodes = 10
        if self.on_worker_death == "record" and self.workers == 0:
            raise ValueError("on_worker_death='record' needs Ray workers (workers > 0)")
        if self.workers and self.inference == "local" and self.device in ("cuda", "mps"):
            raise ValueError(f"device {self.device!r} with Ray workers needs batched inference (one server)")
        if isinstance(self.env, GymEnvConfig):
            self._check_gym_env()
        return self

    def _check_gym_env(self) -> None:
        """What only a Meta-World task has: the scripted expert (as policy, human or phase labeller)."""
        name = self.env.env_id
        if self.policy == "scripted" or self.policy.startswith(("scripted:", "scripted?")):
            raise ValueError(
                f"policy {self.policy!r}: Meta-World's scripted expert cannot act in {name}; give your own "
                "(python:<module>:<class>), a checkpoint or a registered version"
            )
        if self.human is not None:
            raise ValueError(f"human: the simulated human is Meta-World's scripted expert; not for {name}")
        if self.subtask_labels:
            raise ValueError(f"subtask_labels: the scripted expert's phases exist for Meta-World tasks, not {name}")

    @property
    def target_unit(self) -> TargetUnit:
        """What the target counts: committed episodes, or steps of committed episodes."""
        return "episodes" if self.env_steps is None else "env_steps"

    @property
    def target(self) -> int:
        """The target in ``target_unit``."""
        return self.env_steps if self.env_steps is not None else self.episodes or 0


class RunSeedError(UserError):
    """A resumed run was given a seed other than the one it was started with."""


@dataclass
class CollectReport:
    """What a collection job produced."""

    run_id: str
    seed: int
    policy_version: str
    episodes: int
    successes: int
    env_steps: int
    human_steps: int
    seconds: float
    worker_failures: int = 0
    committed_env_steps: int = 0
    device: str = "cpu"

    @property
    def success_rate(self) -> float:
        """Fraction of successful episodes."""
        return self.successes / max(self.episodes, 1)


def run_collection(
    config: CollectConfig,
    progress: bool = True,
    policy: Policy | None = None,
    on_start: Callable[[CollectConfig], None] | None = None,
) -> CollectReport:
    """Collect ``config.episodes`` episodes (or ``config.env_steps`` committed steps) into the store.

    A new run (no ``run_id``, or one the store does not know) is recorded with its seed; an existing run is
    topped up to the target, continuing its episode sequence with its recorded seed (``RunSeedError`` if
    ``config.seed`` names another one). ``policy`` overrides loading ``config.policy`` (e.g. a RECAP policy
    already set to its "Advantage: positive" condition); its version must be registered in the store.
    ``on_start`` is called with the run's config (its run id and seed filled in) before any episode starts.
    The policy infers on ``config.inference_device``, recorded in the run's config as ``device``.
    """
    store = ExperienceStore(config.store_url)
    store.upgrade()
    config = start_run(store, config.model_copy(update={"device": config.inference_device}))
    run_id, seed = config.run_id, config.seed
    if policy is None:
        source = resolve(config.policy, store, noise=config.noise)
        policy = load(source, task=config.env.task, store=store, seed=seed)
        register(store, source, policy.version)
    if config.workers == 0:
        policy = place(policy, config.device)
    if on_start is not None:
        on_start(config)
    limit = config.episodes if config.target_unit == "episodes" else None
    sink = StoreSink(config.store_url, max_run_episodes=limit)
    worker_kwargs = dict(
        env_factories=[functools.partial(make_env, config.env, config.human, config.inject)] * config.envs_per_worker,
        policy=policy,
        sink=ExpertPhaseLabels(sink, config.env.task) if config.subtask_labels else sink,
        task=config.env.task,
        seed=seed,
        run_id=run_id,
        record_images=config.record_images,
        execution=config.execution,
        episode_metadata={**config.metadata, "noise_std": config.noise},
        claim_episode_index=RunEpisodeIndex(config.store_url, run_id),
    )
    count_committed = functools.partial(_count_committed, store, run_id, config.target_unit)
    if config.workers == 0:
        stats = _collect_in_process(worker_kwargs, config, count_committed, progress)
        failures = 0
    else:
        stats, failures = _collect_on_ray(config, worker_kwargs, count_committed, progress)
    return CollectReport(
        run_id=run_id,
        seed=seed,
        policy_version=policy.version,
        episodes=store.count_episodes(run_id=run_id),
        successes=store.count_episodes(run_id=run_id, outcome="success"),
        env_steps=stats.env_steps,
        human_steps=stats.human_steps,
        seconds=stats.seconds,
        worker_failures=failures,
        committed_env_steps=_count_committed(store, run_id, "env_steps"),
        device=config.device,
    )


def _new_run_id() -> str:
    """A fresh collection run id (``collect-<12 hex digits>``)."""
    return f"collect-{uuid.uuid4().hex[:12]}"


def start_run(store: ExperienceStore, config: CollectConfig) -> CollectConfig:
    """Record the run in the store (first time only); ``config`` with the run's id and its run seed.

    The seed is the one recorded when the run started; ``config.seed`` None takes it (or, for a new run, a
    fresh random one), any other value must match it. A run recorded without a seed (created implicitly by an
    episode) takes ``config.seed`` or 0.
    """
    run_id = config.run_id or _new_run_id()
    fresh = secrets.randbits(32) if config.seed is None else config.seed
    store.register_run(
        run_id,
        name="collect",
        config=config.model_copy(update={"run_id": run_id, "seed": fresh}).model_dump(mode="json"),
    )
    [run] = [run for run in store.list_runs(prefix=run_id) if run["id"] == run_id]
    recorded = run["config"].get("seed")
    if recorded is None:
        recorded = config.seed or 0
    if config.seed is not None and config.seed != recorded:
        raise RunSeedError(
            f"seed: run {run_id} was started with seed {recorded}, got {config.seed}; "
            "omit the seed to resume the run, or use a new run id"
        )
    return config.model_copy(update={"run_id": run_id, "seed": int(recorded)})


def collect_scripted_demos(
    env: EnvConfig | GymEnvConfig,
    store_url: str,
    run_id: str,
    episodes: int,
    noise: float,
    seed: int = 0,
    subtask_labels: bool = False,
    progress: bool = False,
) -> CollectReport:
    """Noisy scripted-expert demonstrations into ``run_id`` (idempotent: the run is topped up to ``episodes``)."""
    config = CollectConfig(
        env=env,
        policy="scripted",
        noise=noise,
        episodes=episodes,
        store_url=store_url,
        run_id=run_id,
        seed=seed,
        subtask_labels=subtask_labels,
    )
    return run_collection(config, progress=progress)


def _count_committed(store: ExperienceStore, run_id: str, unit: str) -> int:
    """Committed episodes of the run, or their total steps."""
    if unit == "episodes":
        return store.count_episodes(run_id=run_id)
    return store.count_steps(run_id=run_id)


def _collect_in_process(
    worker_kwargs: dict, config: CollectConfig, count_committed: Callable[[], int], progress: bool
) -> RolloutStats:
    """Run one worker until the target is committed (an env-step target may take several ``run`` calls)."""
    worker = RolloutWorker(**worker_kwargs)
    stats, committed, started = RolloutStats(), count_committed(), time.perf_counter()
    unit = config.target_unit
    with target_progress_bar(unit, config.target, committed, progress) as bar:
        while committed < config.target:
            stats = stats.merge(
                worker.run(
                    **{unit: config.target - committed},
                    on_episode=lambda record: bar.update(1 if unit == "episodes" else record.length),
                )
            )
            committed = count_committed()
    worker.close()
    stats.seconds = time.perf_counter() - started
    return stats


def _collect_on_ray(
    config: CollectConfig, worker_kwargs: dict, count_committed: Callable[[], int], progress: bool
) -> tuple[RolloutStats, int]:
    import ray

    from actors.cluster import RolloutCluster, ensure_ray, start_inference_server

    ensure_ray(config.ray_address)
    server = None
    if config.inference == "batched":
        server, worker_kwargs["policy"] = start_inference_server(
            worker_kwargs["policy"], device=config.device
        )
    cluster = RolloutCluster(config.workers, worker_kwargs, on_worker_death=config.on_worker_death)
    try:
        result = cluster.collect(
            config.target,
            count_committed,
            unit=config.target_unit,
            episodes_per_call=config.envs_per_worker,
            progress=progress,
        )
    finally:
        cluster.shutdown()
        if server is not None:
            ray.kill(server)
    return result.stats, result.worker_failures
