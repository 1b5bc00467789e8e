"""Files an iteration leaves in MLflow: the resolved config, relabel ids, success-over-iterations and
value-along-episode plots (PNG), and rollout GIFs made from the stored episode images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import imageio.v3 as iio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml

from recap.plots import plot_episode_values
from storage import EpisodeRecord, Outcome

if TYPE_CHECKING:
    from experiments.pipeline import IterationState, Pipeline

PLOT_EPISODES = 2
VIDEO_EPISODES = 2


def write_iteration_artifacts(
    pipeline: Pipeline, state: IterationState, folder: Path
) -> list[tuple[Path, str | None]]:
    """Write the iteration's artifacts under ``folder``; returns ``(path, MLflow artifact folder)`` pairs."""
    from experiments.pipeline import dump_json

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(pipeline.config.model_dump(mode="json"), sort_keys=False))
    outputs_path = folder / "stages.json"
    outputs_path.write_text(dump_json(state.outputs))
    files: list[tuple[Path, str | None]] = [(config_path, None), (outputs_path, None)]
    files.append((plot_success_over_iterations(pipeline, folder / "success_over_iterations.png"), "plots"))
    episodes = _showcase_episodes(pipeline, state)
    if "relabel" in state.outputs:
        relabel_path = folder / "relabel_ids.json"
        relabel_path.write_text(dump_json({"relabel_id": state.outputs["relabel"]["relabel_id"]}))
        files.append((relabel_path, None))
        record = pipeline.store.load_relabel(state.outputs["relabel"]["relabel_id"])
        labelled = {labels.episode_uuid for labels in record.labels}
        for episode in episodes[:PLOT_EPISODES]:
            if episode.uuid in labelled:
                path = folder / f"value_along_episode_{episode.outcome.value}_{str(episode.uuid)[:8]}.png"
                files.append((plot_episode_values(episode, record, path), "plots"))
    if state.outputs.get("rlt", {}).get("curve"):
        files.append((plot_rl_curve(state.outputs["rlt"], folder / "rl_curve.png"), "plots"))
    for episode in episodes[:VIDEO_EPISODES]:
        video = write_rollout_gif(
            episode, folder / f"rollout_{episode.outcome.value}_{str(episode.uuid)[:8]}.gif"
        )
        if video is not None:
            files.append((video, "videos"))
    return files


def _showcase_episodes(pipeline: Pipeline, state: IterationState) -> list[EpisodeRecord]:
    """A failed and a successful episode of this iteration's collection (else its RLT run), when there are
    both."""
    runs = list(state.outputs.get("collect", {}).get("runs", {}).values())
    if not runs:
        runs = [pipeline.rlt_run(state.iteration)]
    summaries = [summary for run in runs for summary in pipeline.store.list_episodes(run_id=run)]
    picked = []
    for outcome in (Outcome.FAILURE, Outcome.SUCCESS, Outcome.TRUNCATED):
        match = next((s for s in summaries if s.outcome == outcome), None)
        if match is not None:
            picked.append(pipeline.store.load_episode(match.uuid, images=True))
    return picked


def write_rollout_gif(episode: EpisodeRecord, path: Path, fps: int = 10) -> Path | None:
    """The episode's first camera as an animated GIF (None when it was stored without images)."""
    if not episode.images:
        return None
    frames = next(iter(episode.images.values()))
    iio.imwrite(path, np.asarray(frames, dtype=np.uint8), duration=1000 // fps, loop=0)
    return path


def plot_rl_curve(rlt_output: dict, path: Path) -> Path:
    """The RLT stage's evaluation success rate against env steps (warm-up included)."""
    steps, rates = zip(*rlt_output["curve"], strict=True)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, rates, marker="o")
    axis.set(
        xlabel="env steps",
        ylabel="eval success rate",
        ylim=(-0.02, 1.02),
        title=f"RLT: {rlt_output['version']}",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_success_over_iterations(pipeline: Pipeline, path: Path) -> Path:
    """Candidate and deployed success rate (95% Wilson interval) per iteration, promotions marked."""
    from experiments.evaluation import wilson_interval

    rows = []
    for state in pipeline.iterations():
        if "gate" not in state.outputs:
            continue
        figures = {
            role: [
                sum(f[key] for f in state.outputs["evaluate"][role].values()) for key in ("successes", "n")
            ]
            for role in ("candidate", "deployed")
        }
        rows.append((state.iteration, figures, state.outputs["gate"]["promote"]))
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for role, colour in (("deployed", "tab:gray"), ("candidate", "tab:blue")):
        xs = [row[0] for row in rows]
        rates = [row[1][role][0] / max(row[1][role][1], 1) for row in rows]
        intervals = [wilson_interval(int(row[1][role][0]), int(row[1][role][1])) for row in rows]
        errors = np.clip(
            np.array(
                [
                    [r - lo for r, (lo, _) in zip(rates, intervals, strict=True)],
                    [hi - r for r, (_, hi) in zip(rates, intervals, strict=True)],
                ]
            ),
            0.0,
            None,
        )
        axis.errorbar(xs, rates, yerr=errors, marker="o", capsize=3, label=role, color=colour)
    for iteration, _figures, promoted in rows:
        axis.annotate(
            "promoted" if promoted else "rejected", (iteration, 1.02), ha="center", fontsize="small"
        )
    axis.set(
        xlabel="iteration",
        ylabel="success rate",
        ylim=(-0.02, 1.1),
        title=f"{pipeline.config.name}: success over iterations",
    )
    axis.set_xticks([row[0] for row in rows] or [1])
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
