"""Plots of a relabel (matplotlib, Agg backend): value along an episode, advantage histograms per task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from recap.conditioning import labels_by_episode, matching_labels
from storage.records import EpisodeRecord, Outcome, RelabelRecord


def plot_episode_values(
    episode: EpisodeRecord, record: RelabelRecord, path: str | Path, returns: np.ndarray | None = None
) -> Path:
    """Value V(o_t) along ``episode`` (and the Monte-Carlo return if given), interventions shaded, the
    outcome marked at the last step, positive-indicator steps ticked along the bottom. Saves a PNG."""
    labels = matching_labels(episode, labels_by_episode(record), record.relabel_id)
    steps = np.arange(episode.length)
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.plot(steps, labels.values, label="V(o_t) (held-out)", color="tab:blue")
    if returns is not None:
        axis.plot(steps, returns, label="Monte-Carlo return", color="tab:gray", linestyle="--")
    for number, segment in enumerate(episode.interventions):
        axis.axvspan(
            segment.t_start,
            segment.t_end,
            color="tab:orange",
            alpha=0.25,
            label=None if number else "intervention",
        )
    positive = steps[labels.indicators]
    axis.scatter(
        positive, np.full(positive.size, -1.0), marker="|", color="tab:green", label="advantage positive"
    )
    failed = episode.outcome != Outcome.SUCCESS
    axis.scatter(
        [steps[-1]],
        [labels.values[-1]],
        marker="x" if failed else "*",
        s=120,
        color="tab:red" if failed else "tab:green",
        label=f"{episode.outcome.value}",
        zorder=3,
    )
    axis.set(
        xlabel="step",
        ylabel="normalized return",
        ylim=(-1.05, 0.05),
        title=f"{episode.task} — {episode.uuid}",
    )
    axis.legend(loc="upper left", fontsize="small")
    return _save(figure, path)


def plot_advantage_histograms(
    episodes: Sequence[EpisodeRecord], record: RelabelRecord, path: str | Path
) -> Path:
    """Advantage histogram per task, split by episode outcome, with the task's threshold. Saves a PNG."""
    labels = labels_by_episode(record)
    tasks = sorted({episode.task for episode in episodes})
    thresholds = record.diagnostics.get("thresholds", {})
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for outcome_success, color in ((True, "tab:green"), (False, "tab:red")):
            chosen = [
                ep
                for ep in episodes
                if ep.task == task and (ep.outcome == Outcome.SUCCESS) == outcome_success
            ]
            if chosen:
                values = np.concatenate(
                    [matching_labels(ep, labels, record.relabel_id).advantages for ep in chosen]
                )
                name = "success" if outcome_success else "failure"
                axis.hist(values, bins=40, alpha=0.5, color=color, label=f"{name} episodes")
        if thresholds.get(task) is not None:
            axis.axvline(thresholds[task], color="black", linestyle="--", label="threshold ε")
        axis.set(title=task, xlabel="advantage", ylabel="steps")
        axis.legend(fontsize="small")
    return _save(figure, path)


def _save(figure: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
