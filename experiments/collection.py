"""A collection job: roll a policy out in an env (optionally with a simulated human) and commit every episode.

In-process with ``workers=0`` (tests, debugging); otherwise on Ray rollout actors, with one batched inference
server or a policy copy per worker. Either way the experience store is where the episodes end up.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from actors.execution import ExecutionConfig
from actors.rollout import RolloutStats, RolloutWorker
from actors.sinks import StoreSink
from envs import EnvConfig, SimulatedHumanConfig, make_env
from experiments.context import ExpertPhaseLabels
from experiments.policy_loader import load_policy
from policies.base import Policy
from storage import ExperienceStore


class CollectConfig(BaseModel):
    """Everything a collection job needs (validated; unknown fields are rejected)."""

    model_config = ConfigDict(extra="forbid")

    env: EnvConfig = EnvConfig()
    policy: str = "scripted"
    noise: float = Field(default=0.0, ge=0.0, description="Gaussian action noise of a scripted policy")
    episodes: int = Field(default=10, ge=1)
    human: SimulatedHumanConfig | None = None
    workers: int = Field(default=0, ge=0, description="Ray rollout actors; 0 runs in this process")
    envs_per_worker: int = Field(default=1, ge=1)
    inference: Literal["local", "batched"] = "local"
    ray_address: str | None = None
    store_url: str
    run_id: str | None = None
    seed: int = Field(default=0, ge=0)
    record_images: bool = True
    execution: ExecutionConfig = ExecutionConfig()
    subtask_labels: bool = Field(default=False, description="label steps with the scripted expert's phase")
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)


@dataclass
class CollectReport:
    """What a collection job produced."""

    run_id: str
    policy_version: str
    episodes: int
    successes: int
    env_steps: int
    human_steps: int
    seconds: float
    worker_failures: int = 0

    @property
    def success_rate(self) -> float:
        """Fraction of successful episodes."""
        return self.successes / max(self.episodes, 1)


def run_collection(
    config: CollectConfig, progress: bool = True, policy: Policy | None = None
) -> CollectReport:
    """Collect ``config.episodes`` episodes into the store; returns counts and rates.

    ``policy`` overrides loading ``config.policy`` (e.g. a RECAP policy already set to its "Advantage:
    positive" condition); its version must be registered in the store.
    """
    store = ExperienceStore(config.store_url)
    store.upgrade()
    policy = policy or load_policy(
        config.policy, task=config.env.task, store=store, noise=config.noise, seed=config.seed
    )
    run_id = config.run_id or f"collect-{uuid.uuid4().hex[:12]}"
    store.register_run(run_id, name="collect", config=config.model_dump(mode="json"))
    worker_kwargs = dict(
        env_factories=[functools.partial(make_env, config.env, config.human)] * config.envs_per_worker,
        policy=policy,
        sink=ExpertPhaseLabels(StoreSink(config.store_url), config.env.task)
        if config.subtask_labels
        else StoreSink(config.store_url),
        task=config.env.task,
        seed=config.seed,
        run_id=run_id,
        record_images=config.record_images,
        execution=config.execution,
        episode_metadata={**config.metadata, "noise_std": config.noise},
    )
    already = store.count_episodes(run_id=run_id)
    if config.workers == 0:
        stats, failures = _collect_in_process(worker_kwargs, config.episodes - already, progress), 0
    else:
        stats, failures = _collect_on_ray(config, worker_kwargs, store, run_id, progress)
    return CollectReport(
        run_id=run_id,
        policy_version=policy.version,
        episodes=store.count_episodes(run_id=run_id),
        successes=store.count_episodes(run_id=run_id, outcome="success"),
        env_steps=stats.env_steps,
        human_steps=stats.human_steps,
        seconds=stats.seconds,
        worker_failures=failures,
    )


def collect_scripted_demos(
    env: EnvConfig,
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


def _collect_in_process(worker_kwargs: dict, episodes: int, progress: bool) -> RolloutStats:
    worker = RolloutWorker(**worker_kwargs)
    with tqdm(total=episodes, desc="episodes", unit="ep", disable=not progress) as bar:
        stats = (
            worker.run(episodes=episodes, on_episode=lambda _record: bar.update(1))
            if episodes > 0
            else RolloutStats()
        )
    worker.close()
    return stats


def _collect_on_ray(
    config: CollectConfig, worker_kwargs: dict, store: ExperienceStore, run_id: str, progress: bool
) -> tuple[RolloutStats, int]:
    from actors.cluster import RolloutCluster, ensure_ray, start_inference_server

    ensure_ray(config.ray_address)
    if config.inference == "batched":
        _server, worker_kwargs["policy"] = start_inference_server(worker_kwargs["policy"])
    cluster = RolloutCluster(config.workers, worker_kwargs)
    try:
        result = cluster.collect(
            config.episodes,
            lambda: store.count_episodes(run_id=run_id),
            episodes_per_call=config.envs_per_worker,
            progress=progress,
        )
    finally:
        cluster.shutdown()
    return result.stats, result.worker_failures
