"""Context conditions from the π-series: episode-metadata prompts (π0.7) and subtask labels (Hi-Robot / π0.5).

Episode metadata: hidden sources of variation in the data turned into conditions the policy sees.

Each stored episode is described by its demonstration quality (the noise level of whoever acted), its speed
(length relative to the task's median) and its mistakes (how often a human had to step in). Training appends
that description to the prompt (dropped at random, like RECAP's indicator, so the unconditioned policy is
trained too); at inference the policy is asked for the behaviour wanted: ``quality: high, speed: fast,
mistakes: none``.

Subtasks: each step's subtask label (scripted-expert phase for demonstrations, the high level's or a human's
name in rollouts; see ``actors.recorder`` for provenance) becomes ``subtask: <name>`` on the low-level VLA's
prompt, and a small high-level ``SubtaskModel`` learns to name it from the camera, the state and the task
prompt (``train_hierarchical``). ``phase_outcomes`` says where episodes end in terms of the expert's phases.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.recorder import SUBTASK_EXPERT, SUBTASK_SOURCES_KEY, source_segments
from envs.experts import expert_phases
from envs.tasks import episode_prompt
from experiments.evaluation import EvalResult
from experiments.training import (
    BCConfig,
    TrainedPolicy,
    _evaluate_and_record,
    load_training_episodes,
    train_vla,
)
from policies.hierarchical import (
    HierarchicalPolicy,
    SubtaskModel,
    previous_subtasks,
    save_hierarchical,
    train_subtask_model,
)
from storage import EpisodeQuery, EpisodeRecord, ExperienceStore

DESIRED_METADATA = "quality: high, speed: fast, mistakes: none"


class MetadataPromptConfig(BaseModel):
    """How episode metadata maps to prompt words (validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    high_quality_max_noise: float = Field(
        default=0.1, ge=0.0, description="noise_std ≤ this is 'high' quality"
    )
    medium_quality_max_noise: float = Field(default=0.5, ge=0.0, description="noise_std ≤ this is 'medium'")
    fast_fraction_of_median: float = Field(
        default=1.0, gt=0.0, description="length ≤ this × median is 'fast'"
    )
    noise_key: str = "noise_std"


def quality_word(noise_std: float | None, config: MetadataPromptConfig) -> str | None:
    """'high', 'medium' or 'low' demonstration quality from the actor's noise level (None if unknown)."""
    if noise_std is None:
        return None
    if noise_std <= config.high_quality_max_noise:
        return "high"
    return "medium" if noise_std <= config.medium_quality_max_noise else "low"


def task_median_lengths(episodes: Sequence[EpisodeRecord]) -> dict[str, float]:
    """Median length of the successful episodes of each task (all episodes where a task has no success)."""
    medians: dict[str, float] = {}
    for task in {episode.task for episode in episodes}:
        of_task = [e for e in episodes if e.task == task]
        successful = [e.length for e in of_task if e.outcome == "success"] or [e.length for e in of_task]
        medians[task] = float(np.median(successful))
    return medians


def metadata_prompt(
    episode: EpisodeRecord, median_length: float, config: MetadataPromptConfig | None = None
) -> str:
    """The episode's description, e.g. ``quality: medium, speed: slow, mistakes: some``."""
    config = config or MetadataPromptConfig()
    parts = []
    quality = quality_word(episode.metadata.get(config.noise_key), config)
    if quality is not None:
        parts.append(f"quality: {quality}")
    fast = episode.outcome == "success" and episode.length <= config.fast_fraction_of_median * median_length
    parts.append(f"speed: {'fast' if fast else 'slow'}")
    parts.append(f"mistakes: {'none' if not episode.interventions else 'some'}")
    return ", ".join(parts)


def metadata_conditions(
    episodes: Sequence[EpisodeRecord], config: MetadataPromptConfig | None = None
) -> dict[object, list[str | None]]:
    """Per-step condition texts (the episode's description on every step), keyed by episode uuid."""
    config = config or MetadataPromptConfig()
    medians = task_median_lengths(episodes)
    return {
        episode.uuid: [metadata_prompt(episode, medians[episode.task], config)] * episode.length
        for episode in episodes
    }


class ExpertPhaseLabels:
    """A sink wrapper that labels each step of a scripted episode with the expert's phase before storing it.

    Subtask provenance goes into the episode metadata (``subtask_source: expert_phase``). Picklable, so it
    travels into Ray rollout actors with the sink it wraps.
    """

    def __init__(self, sink: Callable[[EpisodeRecord], object], task: str) -> None:
        self.sink = sink
        self.task = task

    def __call__(self, record: EpisodeRecord) -> object:
        """Label ``record`` (when it carries the simulator state) and pass it on."""
        if record.privileged is not None and record.length > 0:
            record.subtasks = expert_phases(self.task, record.privileged)
            record.metadata = {
                **record.metadata,
                "subtask_source": SUBTASK_EXPERT,
                SUBTASK_SOURCES_KEY: source_segments([SUBTASK_EXPERT] * record.length),
            }
        return self.sink(record)


def subtask_prompt(subtask: str | None) -> str | None:
    """The condition text of a subtask label."""
    return None if subtask is None else f"subtask: {subtask}"


def subtask_labels(record: EpisodeRecord) -> list[str | None]:
    """The episode's stored per-step subtasks, or the scripted expert's phases derived from its simulator state."""
    if record.subtasks is not None:
        return list(record.subtasks)
    if record.privileged is None:
        raise ValueError(
            f"episode {record.uuid}: no stored subtasks and no privileged state to derive expert phases from"
        )
    return expert_phases(record.task, record.privileged)


def train_metadata_conditioned(
    store: ExperienceStore,
    selection: EpisodeQuery,
    config: BCConfig,
    output_dir: Path,
    *,
    desired: str = DESIRED_METADATA,
    prompt_config: MetadataPromptConfig | None = None,
    progress: bool = True,
) -> TrainedPolicy:
    """Train the VLA with each episode's metadata description on its prompt; it is queried with ``desired``."""
    descriptions = metadata_conditions(load_training_episodes(store, selection), prompt_config)
    return train_vla(
        store,
        selection,
        config,
        output_dir,
        conditions=lambda episode: descriptions[episode.uuid],
        inference_conditions=desired,
        progress=progress,
    )


class SubtaskTrainConfig(BaseModel):
    """Optimisation of the high-level subtask model."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=500, ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    history: int = Field(default=1, ge=0)  # recent subtasks the high level sees (the demo's previous labels)
    history_noise: float = Field(
        default=0.3, ge=0, le=1
    )  # chance each is replaced by a random one in training


@dataclass
class TrainedHierarchical:
    """A trained, saved and registered two-level policy."""

    policy: HierarchicalPolicy
    checkpoint: Path
    version: str
    low_level: TrainedPolicy
    subtask_losses: list[float]
    subtasks: tuple[str, ...]
    evaluations: list[EvalResult]


def train_hierarchical(
    store: ExperienceStore,
    selection: EpisodeQuery,
    config: BCConfig,
    output_dir: Path,
    *,
    subtask: SubtaskTrainConfig | None = None,
    progress: bool = True,
) -> TrainedHierarchical:
    """Train a subtask-conditioned VLA and a high-level subtask model on the same episodes; save, register, evaluate.

    Labels come from ``subtask_labels`` (stored, else expert phases); the high level sees the low level's first camera.
    """
    subtask = subtask or SubtaskTrainConfig()
    records = load_training_episodes(store, selection)
    labels = {record.uuid: subtask_labels(record) for record in records}
    low = train_vla(
        store,
        selection,
        config.model_copy(update={"eval_episodes": 0}),
        output_dir,
        conditions=lambda episode: [subtask_prompt(s) for s in labels[episode.uuid]],
        progress=progress,
    )
    high, losses = _train_high_level(records, labels, low.policy.config.cameras[0], subtask, config.seed, progress)
    policy = HierarchicalPolicy(high, low.policy)
    checkpoint = output_dir / f"hier-{uuid.uuid4().hex[:8]}"
    version = save_hierarchical(policy, checkpoint)
    store.register_policy_version(
        version,
        kind="hierarchical",
        uri=str(checkpoint.resolve()),
        parent=low.version,
        metadata={
            "subtasks": list(high.vocabulary.subtasks),
            "subtask_config": subtask.model_dump(mode="json"),
            "final_subtask_loss": losses[-1],
        },
    )
    evaluations = [
        _evaluate_and_record(store, policy, task, config)
        for task in selection.tasks
        if config.eval_episodes > 0
    ]
    return TrainedHierarchical(
        policy, checkpoint, version, low, losses, high.vocabulary.subtasks, evaluations
    )


def _train_high_level(
    records: list[EpisodeRecord],
    labels: dict[object, list[str | None]],
    camera: str,
    config: SubtaskTrainConfig,
    seed: int,
    progress: bool,
) -> tuple[SubtaskModel, list[float]]:
    """Fit the subtask model on every labelled step of ``records``."""
    missing = [str(r.uuid) for r in records if camera not in r.images and r.length > 0]
    if missing:
        raise ValueError(f"images: camera {camera!r} is not stored for episode {missing[0]}")
    rows = [
        (record.images[camera][t], record.states[t], episode_prompt(record.prompt, record.task), label, recent)
        for record in records
        for t, (label, recent) in enumerate(
            zip(labels[record.uuid], previous_subtasks(labels[record.uuid], config.history), strict=True)
        )
        if label is not None
    ]
    if not rows:
        raise ValueError("subtasks: the selected episodes have no labelled steps")
    images, states, prompts, names, previous = zip(*rows, strict=True)
    return train_subtask_model(
        np.stack(images),
        np.stack(states),
        list(prompts),
        list(names),
        camera=camera,
        previous=list(previous),
        history=config.history,
        history_noise=config.history_noise,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=seed,
        progress=progress,
    )


def _phase_index(phase: str) -> int:
    return int(phase.removeprefix("phase")) if phase.removeprefix("phase").isdigit() else -1


def phase_outcomes(records: Sequence[EpisodeRecord], task: str) -> dict[str, object]:
    """Where episodes end, in the scripted expert's phases (from each episode's simulator state).

    For failed episodes: how often each phase was the furthest reached (highest phase index; for pick-place and
    push the index order is the temporal order) and the phase at the last step; for episodes with policy
    subtasks, the subtask named at the last step and the fraction of steps whose named subtask equals the
    expert's phase.
    """
    furthest: Counter[str] = Counter()
    final: Counter[str] = Counter()
    named_final: Counter[str] = Counter()
    agree = labelled = 0
    failures = [r for r in records if r.outcome != "success" and r.privileged is not None and r.length > 0]
    for record in records:
        if record.subtasks is None or record.privileged is None:
            continue
        phases = expert_phases(task, record.privileged)
        pairs = [(s, p) for s, p in zip(record.subtasks, phases, strict=True) if s is not None]
        agree += sum(s == p for s, p in pairs)
        labelled += len(pairs)
    for record in failures:
        phases = expert_phases(task, record.privileged)
        furthest[max(phases, key=_phase_index)] += 1
        final[phases[-1]] += 1
        if record.subtasks is not None:
            named_final[str(record.subtasks[-1])] += 1
    return {
        "failures": len(failures),
        "furthest_phase": dict(sorted(furthest.items())),
        "final_phase": dict(sorted(final.items())),
        "final_named_subtask": dict(sorted(named_final.items())),
        "subtask_agreement": agree / labelled if labelled else None,
    }
