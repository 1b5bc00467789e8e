"""Context conditions from the π-series: episode-metadata prompts (π0.7) and subtask labels (Hi-Robot / π0.5).

Episode metadata: hidden sources of variation in the data turned into conditions the policy sees.

Each stored episode is described by its demonstration quality (the noise level of whoever acted), its speed
(length relative to the task's median) and its mistakes (how often a human had to step in). Training appends
that description to the prompt (dropped at random, like RECAP's indicator, so the unconditioned policy is
trained too); at inference the policy is asked for the behaviour wanted: ``quality: high, speed: fast,
mistakes: none``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from envs.experts import expert_phases
from storage import EpisodeRecord

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
            record.metadata = {**record.metadata, "subtask_source": "expert_phase"}
        return self.sink(record)


def subtask_prompt(subtask: str | None) -> str | None:
    """The condition text of a subtask label."""
    return None if subtask is None else f"subtask: {subtask}"
