"""Plots of a relabel (matplotlib, Agg backend): value along an episode, the per-episode view (frames over
value, labels, interventions and injected ground truth), advantage histograms per task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from recap.conditioning import labels_by_episode, matching_labels
from storage.records import EpisodeLabels, EpisodeRecord, Outcome, RelabelRecord


def plot_episode_values(
    episode: EpisodeRecord, record: RelabelRecord, path: str | Path, returns: np.ndarray | None = None
) -> Path:
    """Value V(o_t) along ``episode`` (and the Monte-Carlo return if given), interventions shaded, injected bad
    steps (ground truth) shaded, the outcome marked at the last step, positive-indicator steps ticked along the
    bottom. Saves a PNG."""
    labels = matching_labels(episode, labels_by_episode(record), record.relabel_id)
    figure, axis = plt.subplots(figsize=(8, 3.5))
    _value_panel(axis, episode, labels, returns)
    return _save(figure, path)


def plot_episode_view(
    episodes: Sequence[EpisodeRecord], record: RelabelRecord, path: str | Path, frames: int = 8
) -> Path:
    """One figure a reviewer can read an iteration's labels from: per episode, ``frames`` camera frames evenly
    spaced along the episode (first camera; left out for episodes stored without images) above the value
    curve, the advantage labels (green ticks positive, red negative), human interventions (orange) and the
    ground-truth injected bad steps (grey). Saves a PNG."""
    if not episodes:
        raise ValueError("episodes: expected at least one episode to plot")
    by_uuid = labels_by_episode(record)
    rows = [(episode, bool(episode.images)) for episode in episodes]
    ratios = [r for _, images in rows for r in ((1.4, 2.2) if images else (2.2,))]
    figure, axes = plt.subplots(
        len(ratios), 1, figsize=(10, 1.2 + 1.65 * len(ratios)), height_ratios=ratios, squeeze=False
    )
    panels = iter(axes[:, 0])
    for episode, images in rows:
        labels = matching_labels(episode, by_uuid, record.relabel_id)
        if images:
            _filmstrip(next(panels), episode, frames)
        _value_panel(next(panels), episode, labels, None, negatives=True)
    return _save(figure, path)


def _filmstrip(axis: plt.Axes, episode: EpisodeRecord, frames: int) -> None:
    """``frames`` evenly spaced frames of the first camera, side by side, each captioned with its step."""
    video = next(iter(episode.images.values()))
    steps = np.unique(np.linspace(0, episode.length - 1, frames).round().astype(int))
    axis.imshow(np.concatenate([video[t] for t in steps], axis=1))
    width = video.shape[2]
    axis.set_xticks(
        [(k + 0.5) * width for k in range(len(steps))], [f"t={t}" for t in steps], fontsize="small"
    )
    axis.set_yticks([])
    axis.set_title(f"{episode.task} — {episode.outcome.value} — {str(episode.uuid)[:8]}", fontsize="small")


def _value_panel(
    axis: plt.Axes,
    episode: EpisodeRecord,
    labels: EpisodeLabels,
    returns: np.ndarray | None,
    negatives: bool = False,
) -> None:
    """Value curve, labels, interventions, injected bad steps and the outcome on one axis."""
    steps = np.arange(episode.length)
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
    for number, (start, end) in enumerate(_runs([kind is not None for kind in episode.injected or []])):
        axis.axvspan(
            start - 0.5, end - 0.5, color="black", alpha=0.15, label=None if number else "injected (truth)"
        )
    positive = steps[labels.indicators]
    axis.scatter(
        positive, np.full(positive.size, -1.0), marker="|", color="tab:green", label="advantage positive"
    )
    if negatives:
        negative = steps[~np.asarray(labels.indicators, dtype=bool)]
        axis.scatter(
            negative, np.full(negative.size, -0.95), marker="|", color="tab:red", label="advantage negative"
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
        xlim=(-0.5, episode.length - 0.5),
        title=f"{episode.task} — {episode.uuid}",
    )
    axis.legend(loc="upper left", fontsize="x-small", ncol=3)


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """``(start, end)`` (end exclusive) of every run of True in ``flags``."""
    runs: list[tuple[int, int]] = []
    for t, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        elif flag:
            runs.append((t, t + 1))
    return runs


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
