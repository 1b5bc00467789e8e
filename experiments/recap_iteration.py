"""One RECAP improvement iteration, end to end: collect with the current policy and a simulated human →
train the value model and relabel (cross-fitted) → retrain the policy advantage-conditioned → evaluate → record.

Each stage reads from and writes to the experience store, so the iteration is reproducible from the store and
its saved config: the relabel version, the policy version (with its parent) and the evaluations all land there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.types import LEARNABLE_OUTCOMES
from envs import EnvConfig, GymEnvConfig, SimulatedHumanConfig
from experiments.collection import CollectConfig, CollectReport, run_collection
from experiments.evaluation import EvalResult, evaluate
from experiments.policy_loader import load, register, resolve
from experiments.training import BCConfig, EpisodeFilter, TrainedPolicy, load_training_episodes, train_vla
from recap import POSITIVE_PROMPT, RelabelConfig, conditioned_episodes, relabel
from recap.config import Conditioning
from storage import EpisodeRecord, ExperienceStore, RelabelRecord

logger = logging.getLogger(__name__)


class RecapIterationConfig(BaseModel):
    """Settings of one RECAP iteration (validated; saved with the run)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="a Meta-World task or a gymnasium env name (the env's task)")
    policy: str = Field(description="the current policy: a registered version or checkpoint directory")
    store_url: str
    env: EnvConfig | GymEnvConfig
    collect_episodes: int = Field(default=50, ge=1)
    human: SimulatedHumanConfig | None = SimulatedHumanConfig()
    relabel: RelabelConfig = RelabelConfig()
    bc: BCConfig = BCConfig(condition_dropout=0.3)
    data_runs: list[str] | None = Field(
        default=None, description="runs to aggregate (default: every stored run)"
    )
    cfg_beta: float = Field(default=1.0, ge=0.0)
    conditioning: Conditioning = Field(
        default="explicit",
        description="explicit: positive/negative text on every step; positive_only: negative steps unconditioned",
    )
    retrain_from: Path | None = Field(
        default=None,
        description="pretrained checkpoint the policy is retrained from each iteration (default: a fresh model)",
    )
    eval_episodes: int = Field(default=50, ge=0)
    seed: int = 0


@dataclass
class RecapIterationResult:
    """What one iteration produced."""

    collection: CollectReport
    relabel: RelabelRecord
    trained: TrainedPolicy
    before: EvalResult | None
    after: EvalResult | None


def with_task_horizon(config: RelabelConfig, task: str, horizon: int) -> RelabelConfig:
    """The relabel config with the task's episode limit as its return horizon (unless one is configured, or the
    env declares no limit: 0, the longest stored episode then)."""
    reward = config.value.reward
    if reward.max_episode_length is not None or not horizon:
        return config
    value = config.value.model_copy(
        update={"reward": reward.model_copy(update={"max_episode_length": {task: horizon}})}
    )
    return config.model_copy(update={"value": value})


def collect_stage(config: RecapIterationConfig, progress: bool = True) -> CollectReport:
    """Roll out the current policy with the simulated human watching; every episode is committed."""
    return run_collection(
        CollectConfig(
            env=config.env,
            policy=config.policy,
            episodes=config.collect_episodes,
            human=config.human,
            store_url=config.store_url,
            seed=config.seed,
            metadata={"stage": "recap-collect"},
        ),
        progress=progress,
    )


def relabel_stage(
    store: ExperienceStore, episodes: list[EpisodeRecord], config: RelabelConfig
) -> RelabelRecord:
    """Cross-fitted value models relabel every episode; the relabel is stored as a new version."""
    record = relabel(episodes, config)
    record.relabel_id = store.write_relabel(record)
    diagnostics = record.diagnostics
    if not diagnostics.get("sanity_ok", True):
        logger.warning(
            "relabel %s failed its sanity floor: %s", record.relabel_id, diagnostics.get("sanity_failures")
        )
    return record


def train_stage(
    store: ExperienceStore,
    selection: EpisodeFilter,
    record: RelabelRecord,
    config: RecapIterationConfig,
    output_dir: Path,
    parent_version: str,
    progress: bool = True,
) -> TrainedPolicy:
    """Retrain the policy on all aggregated data with per-step "Advantage: positive/negative" conditions."""
    by_uuid = {
        item.episode.uuid: item.conditions
        for item in conditioned_episodes(
            load_training_episodes(store, selection, images=False), record, config.conditioning
        )
    }
    return train_vla(
        store,
        selection,
        config.bc,
        output_dir,
        conditions=lambda episode: by_uuid[episode.uuid],
        init_from=config.retrain_from,
        inference_conditions=POSITIVE_PROMPT,
        cfg_beta=config.cfg_beta,
        parent_version=parent_version,
        progress=progress,
    )


def run_recap_iteration(
    config: RecapIterationConfig, output_dir: Path, progress: bool = True
) -> RecapIterationResult:
    """Collect → relabel → retrain → evaluate, recording each product in the store."""
    store = ExperienceStore(config.store_url)
    store.upgrade()
    source = resolve(config.policy, store)
    current = load(source, task=config.task, store=store, seed=config.seed)
    register(store, source, current.version)
    before = _evaluate(store, current, config, conditions=None)
    collection = collect_stage(config, progress)
    selection = EpisodeFilter(
        tasks=[config.task], run_ids=config.data_runs, outcomes=[o.value for o in LEARNABLE_OUTCOMES]
    )
    episodes = load_training_episodes(store, selection, images=config.relabel.value.camera is not None)
    record = relabel_stage(
        store, episodes, with_task_horizon(config.relabel, config.task, config.env.episode_steps)
    )
    trained = train_stage(store, selection, record, config, output_dir, current.version, progress)
    after = _evaluate(store, trained.policy, config, conditions=POSITIVE_PROMPT)
    return RecapIterationResult(collection, record, trained, before, after)


def _evaluate(
    store: ExperienceStore, policy, config: RecapIterationConfig, conditions: str | None
) -> EvalResult | None:
    if config.eval_episodes == 0:
        return None
    result, _ = evaluate(policy, config.env.model_copy(update={"render": True}), config.eval_episodes)
    store.write_evaluation(
        policy.version,
        config.task,
        result.n,
        result.successes,
        metrics=result.as_metrics() | {"conditioned": conditions is not None},
    )
    return result
