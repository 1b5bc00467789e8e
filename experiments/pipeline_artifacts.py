"""Files an iteration leaves in MLflow: the resolved config, relabel ids, the success-over-iterations plot and
the per-episode view (PNG: frames over value, advantage labels, interventions and injected bad steps of a failed
and a successful episode, :func:`recap.plots.plot_episode_view`), rollout GIFs made from the stored episode
images, and a candidate-vs-deployed GIF of one evaluation episode each (same seed), side by side; frames are
scaled up to about :data:`VIDEO_SIDE` px so a person can judge them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import imageio.v3 as iio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml
from PIL import Image, ImageDraw

from experiments.evaluation import evaluate
from recap.plots import plot_episode_view
from storage import EpisodeRecord, Outcome

if TYPE_CHECKING:
    from experiments.pipeline_config import PipelineConfig
    from experiments.stages import RLTOutput, StageOutput
    from policies.base import Policy
    from storage import ExperienceStore

PLOT_EPISODES = 2
VIDEO_EPISODES = 2
#: Videos show each camera frame scaled up (nearest neighbour, by a whole factor) to at least this side.
VIDEO_SIDE = 192
COMPARISON_VIDEO = "candidate_vs_deployed.gif"
#: The iteration's per-episode view: frames over value, advantage labels, interventions and injected bad steps.
EPISODE_VIEW = "episode_view.png"


class IterationState(Protocol):
    """One iteration's stage outputs (``experiments.pipeline.IterationState`` is one)."""

    iteration: int
    outputs: dict[str, StageOutput]


class Pipeline(Protocol):
    """What the artifact writers read from the pipeline (``experiments.pipeline.Pipeline``), named structurally
    so that this module does not import the pipeline that imports it."""

    config: PipelineConfig
    store: ExperienceStore

    def rlt_run(self, iteration: int) -> str: ...

    def iterations(self) -> Sequence[IterationState]: ...

    def _load(self, version: str, task: str, seed: int | None = None) -> Policy: ...


def dump_json(data: Any) -> str:
    """Pretty JSON for artifacts."""
    return json.dumps(
        data, indent=1, default=lambda value: value.item() if hasattr(value, "item") else str(value)
    )


def write_iteration_artifacts(
    pipeline: Pipeline, state: IterationState, folder: Path
) -> list[tuple[Path, str | None]]:
    """Write the iteration's artifacts under ``folder``; returns ``(path, MLflow artifact folder)`` pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(pipeline.config.model_dump(mode="json"), sort_keys=False))
    outputs_path = folder / "stages.json"
    outputs_path.write_text(
        dump_json({stage: output.model_dump(mode="json") for stage, output in state.outputs.items()})
    )
    files: list[tuple[Path, str | None]] = [(config_path, None), (outputs_path, None)]
    files.append((plot_success_over_iterations(pipeline, folder / "success_over_iterations.png"), "plots"))
    episodes = _showcase_episodes(pipeline, state)
    if "relabel" in state.outputs:
        relabel_path = folder / "relabel_ids.json"
        relabel_id = state.outputs["relabel"].relabel_id
        relabel_path.write_text(dump_json({"relabel_id": relabel_id}))
        files.append((relabel_path, None))
        record = pipeline.store.load_relabel(relabel_id)
        labelled = {labels.episode_uuid for labels in record.labels}
        shown = [episode for episode in episodes[:PLOT_EPISODES] if episode.uuid in labelled]
        if shown:
            files.append((plot_episode_view(shown, record, folder / EPISODE_VIEW), "plots"))
    if "rlt" in state.outputs and state.outputs["rlt"].curve:
        files.append((plot_rl_curve(state.outputs["rlt"], folder / "rl_curve.png"), "plots"))
    for episode in episodes[:VIDEO_EPISODES]:
        video = write_rollout_gif(
            episode, folder / f"rollout_{episode.outcome.value}_{str(episode.uuid)[:8]}.gif"
        )
        if video is not None:
            files.append((video, "videos"))
    if "evaluate" in state.outputs and pipeline.config.collection.record_images:
        files.append((write_comparison_gif(pipeline, state, folder / COMPARISON_VIDEO), "videos"))
    return files


def _showcase_episodes(pipeline: Pipeline, state: IterationState) -> list[EpisodeRecord]:
    """A failed and a successful episode of this iteration's collection (else its RLT run), when there are
    both."""
    runs = list(state.outputs["collect"].runs.values()) if "collect" in state.outputs else []
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
    """The episode's first camera as an animated GIF, scaled up to :data:`VIDEO_SIDE` (None when it was stored
    without images)."""
    if not episode.images:
        return None
    frames = upscale(np.asarray(next(iter(episode.images.values())), dtype=np.uint8))
    iio.imwrite(path, frames, duration=1000 // fps, loop=0)
    return path


def upscale(frames: np.ndarray, side: int = VIDEO_SIDE) -> np.ndarray:
    """``T×H×W×3`` frames scaled by the whole factor that brings their height to at least ``side``."""
    factor = max(1, -(-side // frames.shape[1]))
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def write_comparison_gif(pipeline: Pipeline, state: IterationState, path: Path, fps: int = 10) -> Path:
    """One evaluation episode of the candidate and of the deployed policy (first task, first evaluation
    seed), side by side with a caption naming each version and its outcome; the shorter one holds its last
    frame."""
    versions = state.outputs["evaluate"].versions
    task, seed = pipeline.config.tasks[0], pipeline.config.evaluation.seed
    env = pipeline.config.env.env(task, seed)
    panels = []
    for role in ("candidate", "deployed"):
        policy = pipeline._load(versions[role], task)
        _, [record] = evaluate(policy, env, 1, seed=seed, record_images=True)
        frames = upscale(np.asarray(record.images[env.cameras[0]], dtype=np.uint8))
        panels.append(_captioned(frames, f"{role}: {versions[role]} ({record.outcome.value})"))
    length = max(len(panel) for panel in panels)
    padded = [np.concatenate([p, np.repeat(p[-1:], length - len(p), axis=0)]) for p in panels]
    iio.imwrite(path, np.concatenate(padded, axis=2), duration=1000 // fps, loop=0)
    return path


def _captioned(frames: np.ndarray, caption: str, height: int = 16) -> np.ndarray:
    """Frames with a black caption bar above them (white text, cut to the frame's width)."""
    bar = Image.new("RGB", (frames.shape[2], height))
    ImageDraw.Draw(bar).text((2, 2), caption, fill=(255, 255, 255))
    header = np.repeat(np.asarray(bar)[None], len(frames), axis=0)
    return np.concatenate([header, frames], axis=1)


def plot_rl_curve(rlt_output: RLTOutput, path: Path) -> Path:
    """The RLT stage's evaluation success rate against env steps (warm-up included)."""
    steps, rates = zip(*rlt_output.curve, strict=True)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, rates, marker="o")
    axis.set(
        xlabel="env steps",
        ylabel="eval success rate",
        ylim=(-0.02, 1.02),
        title=f"RLT: {rlt_output.version}",
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
        evaluation = state.outputs["evaluate"]
        figures = {role: evaluation.pooled(role) for role in ("candidate", "deployed")}
        rows.append((state.iteration, figures, state.outputs["gate"].promote))
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
