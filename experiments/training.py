"""Train the built-in VLA by behaviour cloning on episodes from the experience store, evaluate, register.

The store view picks the episodes (tasks, runs, outcomes); ``policies.training`` does the learning; the trained
checkpoint is registered as a policy version so that every episode it later produces points back to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from envs import EnvSettings
from envs.tasks import episode_prompt
from experiments.evaluation import EvalResult, evaluate
from policies.checkpoint import load_checkpoint, save_checkpoint
from policies.device import DeviceName, describe, resolve_device
from policies.training import (
    BCDataset,
    EpisodeArrays,
    TrainConfig,
    TrainResult,
    build_dataset,
    create_policy,
    train_bc,
)
from policies.vla.config import VLAConfig
from policies.vla.policy import VLAPolicy
from recap.conditioning import NEGATIVE_PROMPT, POSITIVE_PROMPT, conditioning_gap
from storage import EpisodeQuery, EpisodeRecord, EpisodeSummary, ExperienceStore

#: Per-step condition text for a stored episode (RECAP's advantage indicator, metadata prompts), or None.
ConditionFn = Callable[[EpisodeRecord], list[str | None] | None]
#: Per-step loss weights for a stored episode (filtered BC: 0/1, AWR: exp(A/τ)), or None for all ones.
WeightFn = Callable[[EpisodeRecord], np.ndarray | None]


#: Image side recorded for a state-input (no camera) model; nothing is rendered at that size.
STATE_TIER_IMAGE_SIZE = 64


class BCConfig(BaseModel):
    """Model size, optimisation and evaluation settings of a BC run. ``env`` is the one env settings model: the
    model reads its cameras (``cameras=()``: the state-input tier) at its image size, and is evaluated in it (its
    episode limit, a gymnasium env's kwargs and declared success)."""

    model_config = ConfigDict(extra="forbid")

    size: Literal["tiny", "small"] = "tiny"
    env: EnvSettings = EnvSettings()
    action_horizon: int = Field(default=10, ge=1)
    knowledge_insulation: bool = False
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=3e-4, gt=0)
    condition_dropout: float = Field(default=0.0, ge=0.0, le=1.0)
    eval_episodes: int = Field(default=0, ge=0)
    eval_every: int = Field(default=0, ge=0)
    seed: int = 0
    device: DeviceName = Field(default="auto", description="cpu, cuda, mps or auto (the accelerator if any)")
    bf16: bool = Field(default=False, description="bfloat16 autocast where the device supports it")
    train_workers: int = Field(default=1, ge=1, description="data-parallel Ray Train workers (DDP)")
    checkpoint_every: int = Field(
        default=200, ge=0, description="write the resumable training state every this many steps (0 = never)"
    )
    validation_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="held-out episodes for the convergence rule (0 = none: train all steps on everything)",
    )
    validate_every: int = Field(default=50, ge=1, description="held-out flow loss every this many steps")
    patience: int = Field(
        default=0,
        ge=0,
        description="stop after this many held-out measurements without improvement (0 = never)",
    )
    min_steps: int | None = Field(
        default=None,
        ge=0,
        description="no early stop before this step (None = half of steps: the high-learning-rate half of the "
        "warmup-cosine schedule, where the held-out loss fluctuates more than it improves; 0 = any step)",
    )
    smoothing: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="the rule compares an exponential moving average of the held-out loss with this factor "
        "(0 = raw measurements)",
    )
    schedule_steps: int | None = Field(
        default=None,
        ge=1,
        description="the span of the warmup-cosine learning-rate schedule (None = steps); fixed apart from steps, "
        "a shorter run is the start of a longer one",
    )
    ema_decay: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="exponential moving average of the weights with this decay: validated, evaluated and kept "
        "(0 = the raw weights)",
    )

    @model_validator(mode="after")
    def _workers_fit(self) -> BCConfig:
        """The global batch is split evenly over the workers; intermediate evaluations need one process."""
        if self.batch_size % self.train_workers:
            raise ValueError(
                f"train_workers: the global batch_size {self.batch_size} must divide among {self.train_workers}"
            )
        if self.train_workers > 1 and self.eval_every:
            raise ValueError("eval_every: with train_workers > 1 the policy is evaluated at the end only (0)")
        if self.train_workers > 1 and self.validation_fraction:
            raise ValueError("validation_fraction: early stopping trains in one process (train_workers = 1)")
        return self

    @field_validator("eval_every")
    @classmethod
    def _eval_every_fits(cls, value: int, info: ValidationInfo) -> int:
        """Evaluate every ``eval_every`` steps (0 = only after the last step): needs evaluation episodes."""
        steps, episodes = info.data.get("steps"), info.data.get("eval_episodes")
        if value and steps is not None and value > steps:
            raise ValueError(f"expected at most steps={steps} (0 = evaluate only at the end), got {value}")
        if value and episodes == 0:
            raise ValueError(f"evaluating every {value} steps needs eval_episodes > 0")
        return value


@dataclass
class TrainedPolicy:
    """A trained, saved and registered policy with its training record."""

    policy: VLAPolicy
    checkpoint: Path
    version: str
    train: TrainResult
    evaluations: list[EvalResult]
    episodes_used: int
    #: Every evaluation during training as (step, result), the final ones (step = ``steps``) included.
    evaluation_curve: list[tuple[int, EvalResult]] = field(default_factory=list)
    #: Advantage-conditioned training only: ``recap.conditioning.conditioning_gap`` of the trained policy on the
    #: held-out samples (else the training samples); None without "Advantage: positive" conditions.
    conditioning: dict[str, float | int | None] | None = None


def select_training_episodes(store: ExperienceStore, selection: EpisodeQuery) -> list[EpisodeSummary]:
    """The index rows of the episodes ``selection`` picks, oldest first (no per-step data read); it must name its
    tasks (each is evaluated on)."""
    if not selection.tasks:
        raise ValueError(f"{selection}: name the tasks to train on")
    summaries = store.find_episodes(selection)
    if not summaries:
        raise ValueError(f"no stored episodes match {selection.as_dict()}")
    return summaries


def load_training_episodes(
    store: ExperienceStore, selection: EpisodeQuery, images: bool = True
) -> list[EpisodeRecord]:
    """The stored episodes selected by ``selection``, oldest first (``images=False`` skips the image blobs)."""
    return [
        store.load_episode(summary.uuid, images=images)
        for summary in select_training_episodes(store, selection)
    ]


def stored_image_layout(
    store: ExperienceStore,
    selection: EpisodeQuery,
    cameras: tuple[str, ...] | None = None,
    image_size: int | None = None,
) -> tuple[tuple[str, ...], int]:
    """The cameras and square image side to train on: ``cameras`` / ``image_size`` if given, else what the
    selected episodes stored (every stored camera, sorted). Read from the store's frame index, no frame decoded.
    ``cameras=()`` — or episodes that stored no images — is the state tier: no cameras (image size recorded only).

    Raises a one-line ``ValueError`` when the selection mixes image sizes or camera sets (naming the runs of
    each, to filter by), or when a given value disagrees with the stored frames.
    """
    if cameras == ():
        return (), image_size or STATE_TIER_IMAGE_SIZE
    summaries = [summary for summary in select_training_episodes(store, selection) if summary.length > 0]
    shapes = store.frame_shapes([summary.uuid for summary in summaries])
    layouts: dict[tuple[tuple[str, int, int], ...], set[str]] = {}
    for summary in summaries:
        layout = tuple(sorted((camera, *shape) for camera, shape in shapes.get(summary.uuid, {}).items()))
        layouts.setdefault(layout, set()).add(summary.run_id or "none")
    if len(layouts) > 1:
        described = "; ".join(
            f"{_describe_layout(layout)} in run(s) {', '.join(sorted(runs))}"
            for layout, runs in layouts.items()
        )
        raise ValueError(
            f"the selected episodes store different images ({described}); train on one kind at a time: "
            "select runs with --run-id"
        )
    (layout,) = layouts
    if not layout:
        if cameras:
            raise ValueError(
                f"--cameras {','.join(cameras)}: the selected episodes stored no camera images "
                "(collected with --no-images?); leave --cameras out to train the state-input model"
            )
        return (), image_size or STATE_TIER_IMAGE_SIZE
    stored_cameras = tuple(camera for camera, _, _ in layout)
    height, width = layout[0][1:]
    if height != width:
        raise ValueError(f"the selected episodes store {height}×{width} frames; the VLA takes square images")
    if image_size is not None and image_size != height:
        raise ValueError(
            f"--image-size {image_size}: the selected episodes store {height} px images "
            "(leave --image-size out to use them)"
        )
    missing = sorted(set(cameras or ()) - set(stored_cameras))
    if missing:
        raise ValueError(
            f"--cameras {','.join(cameras or ())}: the selected episodes store cameras {','.join(stored_cameras)}"
            f" (not {','.join(missing)})"
        )
    return tuple(cameras) if cameras else stored_cameras, height


def _describe_layout(layout: tuple[tuple[str, int, int], ...]) -> str:
    """``corner2 48 px`` / ``corner2+gripper 96 px`` / ``no images``."""
    if not layout:
        return "no images"
    sizes = sorted({f"{h} px" if h == w else f"{h}×{w}" for _, h, w in layout})
    return f"{'+'.join(camera for camera, _, _ in layout)} {'/'.join(sizes)}"


def to_episode_arrays(
    records: list[EpisodeRecord], conditions: ConditionFn | None = None, weights: WeightFn | None = None
) -> list[EpisodeArrays]:
    """Store records → the training loop's per-episode arrays (each episode's stored prompt — the task table's for
    episodes stored without one —, optional conditions and per-step loss weights)."""
    return [
        EpisodeArrays(
            images=record.images,
            state=record.states,
            actions=record.actions,
            prompt=episode_prompt(record.prompt, record.task),
            conditions=conditions(record) if conditions else None,
            weights=weights(record) if weights else None,
        )
        for record in records
        if record.length > 0
    ]


def train_vla(
    store: ExperienceStore,
    selection: EpisodeQuery,
    config: BCConfig,
    output_dir: Path,
    *,
    records: list[EpisodeRecord] | None = None,
    conditions: ConditionFn | None = None,
    weights: WeightFn | None = None,
    init_from: Path | None = None,
    inference_conditions: str | None = None,
    cfg_beta: float = 1.0,
    parent_version: str | None = None,
    progress: bool = True,
    state_dir: Path | None = None,
    resume: bool = True,
) -> TrainedPolicy:
    """Train a VLA on the selected episodes, save it to ``output_dir``, register it, and record its evaluations.

    With ``config.eval_episodes`` > 0 the policy is evaluated in each task's env at the last step and every
    ``config.eval_every`` steps (:class:`EnvEvaluator`): the last point goes to the store's evaluations under the
    registered version, the whole curve into the version's metadata (``evaluation_curve``), in ``config.env``.

    A fresh model unless ``init_from`` names a checkpoint to continue from (RECAP retrains from the prior: its
    weights, tokenizers and normalization statistics are kept; ``config``'s model fields must match it).
    ``weights`` gives per-step loss weights (0 drops a step): filtered BC and AWR ablations. ``records`` are the
    selected episodes already read (with their images when the model reads cameras: the pipeline reads an
    iteration's episodes once for relabel and train); default: read from the store.
    ``inference_conditions`` / ``cfg_beta`` are how the policy is queried after training (RECAP: "Advantage:
    positive"); they are saved in the checkpoint, so evaluation, rollouts and ``flywheel serve`` agree.

    Resumable: every ``config.checkpoint_every`` steps the training state goes to ``state_dir`` (default: a
    folder under ``output_dir/train-state`` named by a fingerprint of the run: config, selection, episodes,
    starting point), and a rerun of the same training continues from it (``resume=False`` discards it). The state
    is removed once the version is registered. ``config.train_workers`` > 1 trains data-parallel on Ray Train
    (:mod:`experiments.distributed`). The device chosen (``auto`` resolved) is recorded in the version metadata.
    """
    parallel = config.train_workers > 1  # the workers read the images of their shards; the driver needs none
    # the state tier reads no images, so episodes stored with and without them train together
    cameras = config.env.camera_names(selection.tasks[0])
    if records is None:
        records = load_training_episodes(store, selection, images=not parallel and bool(cameras))
    arrays = to_episode_arrays(records, conditions, weights)
    training, heldout = split_heldout(arrays, config.validation_fraction, config.seed)
    dataset = build_dataset(training, config.action_horizon)
    validation = build_dataset(heldout, config.action_horizon) if heldout else None
    policy = _initial_policy(dataset, config, cameras, init_from)
    policy.conditions, policy.cfg_beta = inference_conditions, cfg_beta  # evaluations query it as deployed
    evaluator = EnvEvaluator(list(selection.tasks), config) if config.eval_episodes > 0 else None
    if state_dir is None and config.checkpoint_every:
        key = _fingerprint(
            selection, config, records, init_from, parent_version, inference_conditions, arrays
        )
        state_dir = output_dir / "train-state" / key
    if state_dir is not None and not resume:
        shutil.rmtree(state_dir, ignore_errors=True)
    device = resolve_device(config.device)
    train_config = TrainConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        condition_dropout=config.condition_dropout,
        eval_every=config.eval_every,
        seed=config.seed,
        progress=progress,
        device=str(device),
        bf16=config.bf16,
        checkpoint_every=config.checkpoint_every,
        state_dir=state_dir,
        validate_every=config.validate_every,
        patience=config.patience,
        min_steps=config.min_steps,
        smoothing=config.smoothing,
        schedule_steps=config.schedule_steps,
        ema_decay=config.ema_decay,
    )
    if parallel:
        from experiments.distributed import train_bc_data_parallel

        train_result = train_bc_data_parallel(
            store.url, records, arrays, policy, train_config, config.train_workers, output_dir
        )
        if evaluator is not None:
            evaluator(config.steps, policy)
    else:
        train_result = train_bc(policy, dataset, train_config, callback=evaluator, validation=validation)
    conditioning = _conditioning_gap(policy, validation or dataset, seed=config.seed) if conditions else None
    checkpoint = output_dir / f"vla-{uuid.uuid4().hex[:8]}"
    version = save_checkpoint(policy, checkpoint)
    policy.version = version
    store.register_policy_version(
        version,
        kind="vla",
        uri=str(checkpoint.resolve()),
        parent=parent_version,
        metadata={
            "bc_config": config.model_dump(mode="json"),
            "selection": selection.as_dict(),
            "episodes": len(records),
            "init_from": str(init_from.resolve()) if init_from is not None else None,
            "final_loss": train_result.history[-1]["loss"] if train_result.history else None,
            "evaluation_curve": evaluator.curve_metadata() if evaluator else [],
            **describe(device),
            "train_workers": config.train_workers,
            "resumed_from_step": train_result.resumed_from,
            "heldout_episodes": len(heldout),
            "best_step": train_result.best_step,
            "stopped_at": train_result.stopped_at,
            "conditioning": conditioning,
        },
    )
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    curve = evaluator.registered(version) if evaluator else []
    last = train_result.stopped_at or config.steps
    final = [_record_evaluation(store, result) for step, result in curve if step == last]
    return TrainedPolicy(policy, checkpoint, version, train_result, final, len(records), curve, conditioning)


def _conditioning_gap(
    policy: VLAPolicy, dataset: BCDataset, seed: int
) -> dict[str, float | int | None] | None:
    """The trained policy's conditioning gap on ``dataset`` when it carries advantage conditions (against no text
    when negative steps are unconditioned: positive-only conditioning), else None — also None when the policy
    reads cameras the dataset has no images of (data-parallel training leaves the driver without them)."""
    texts = set(dataset.conditions or [])
    if POSITIVE_PROMPT not in texts or (policy.config.cameras and not dataset.images):
        return None
    negative = NEGATIVE_PROMPT if NEGATIVE_PROMPT in texts else None
    return conditioning_gap(policy, dataset, negative=negative, seed=seed)


def split_heldout(
    arrays: list[EpisodeArrays], fraction: float, seed: int
) -> tuple[list[EpisodeArrays], list[EpisodeArrays]]:
    """(training, held-out) episodes: ``round(fraction · n)`` (≥ 1 when ``fraction`` > 0) drawn with ``seed``;
    every arm trained on the same episodes with the same seed holds out the same ones."""
    if not fraction:
        return arrays, []
    if len(arrays) < 2:
        raise ValueError(f"validation_fraction: {len(arrays)} episode; holding one out needs at least 2")
    count = min(len(arrays) - 1, max(1, round(fraction * len(arrays))))
    chosen = set(np.random.default_rng(seed).permutation(len(arrays))[:count].tolist())
    return (
        [episode for i, episode in enumerate(arrays) if i not in chosen],
        [episode for i, episode in enumerate(arrays) if i in chosen],
    )


#: BC settings that do not change what is learned (where and how often it runs, what is evaluated).
_RUNTIME_FIELDS = {
    "device": True,
    "train_workers": True,
    "checkpoint_every": True,
    "eval_episodes": True,
    "eval_every": True,
    "env": {"max_episode_steps"},
}


def _fingerprint(
    selection: EpisodeQuery,
    config: BCConfig,
    records: list[EpisodeRecord],
    init_from: Path | None,
    parent_version: str | None,
    inference_conditions: str | None,
    arrays: list[EpisodeArrays],
) -> str:
    """Names a training run by what it learns from: the same command on the same data finds its own state."""
    payload = {
        "config": config.model_dump(mode="json", exclude=_RUNTIME_FIELDS),
        "selection": selection.as_dict(),
        "episodes": sorted(str(record.uuid) for record in records),
        "init_from": str(init_from.resolve()) if init_from is not None else None,
        "parent": parent_version,
        "inference_conditions": inference_conditions,
        "conditions": [episode.conditions for episode in arrays],
        "weights": [None if episode.weights is None else episode.weights.tolist() for episode in arrays],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class EnvEvaluator:
    """``train_bc``'s callback: evaluates the policy in every task's env and keeps each result with its step.

    Returns the success rate and its Wilson 95% interval per task (``<task>/success``, ``<task>/ci_low``,
    ``<task>/ci_high``), which land in ``TrainResult.evaluations`` and next to the progress bar.
    """

    def __init__(self, tasks: list[str], config: BCConfig) -> None:
        self.tasks = tasks
        self.config = config
        self.results: list[tuple[int, EvalResult]] = []

    def __call__(self, step: int, policy: VLAPolicy) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for task in self.tasks:
            result = _evaluate(policy, task, self.config)
            self.results.append((step, result))
            metrics |= {
                f"{task}/success": result.success_rate,
                f"{task}/ci_low": result.ci_low,
                f"{task}/ci_high": result.ci_high,
            }
        return metrics

    def registered(self, version: str) -> list[tuple[int, EvalResult]]:
        """Every (step, result) relabelled with the registered ``version`` (the weights of the last step)."""
        return [(step, dataclasses.replace(result, policy_version=version)) for step, result in self.results]

    def curve_metadata(self) -> list[dict[str, float | int | str]]:
        """The learning curve for the version's metadata: intermediate weights have no version of their own."""
        return [
            {
                "step": step,
                "task": r.task,
                "n": r.n,
                "successes": r.successes,
                "ci_low": r.ci_low,
                "ci_high": r.ci_high,
            }
            for step, r in self.results
        ]


def _initial_policy(dataset, config: BCConfig, cameras: tuple[str, ...], init_from: Path | None) -> VLAPolicy:
    """A fresh policy reading ``cameras``, fitted on ``dataset``, or the checkpoint at ``init_from`` (checked
    against ``config`` and ``cameras``)."""
    if init_from is not None:
        policy = load_checkpoint(init_from, seed=config.seed)
        expected = (
            cameras,
            config.env.image_size,
            config.action_horizon,
            config.knowledge_insulation,
        )
        found = (
            tuple(policy.config.cameras),
            policy.config.image_size,
            policy.config.action_horizon,
            policy.config.knowledge_insulation,
        )
        if found != expected:
            raise ValueError(
                f"init_from {init_from}: checkpoint has (cameras, image_size, action_horizon, knowledge_insulation)"
                f" = {found}, the BC config asks for {expected}"
            )
        return policy
    vla_config = VLAConfig.preset(
        config.size,
        cameras=cameras,
        image_size=config.env.image_size,
        state_dim=dataset.state.shape[1],
        action_dim=dataset.actions.shape[2],
        action_horizon=config.action_horizon,
        knowledge_insulation=config.knowledge_insulation,
    )
    return create_policy(vla_config, dataset, seed=config.seed)


def _evaluate_and_record(
    store: ExperienceStore, policy: VLAPolicy, task: str, config: BCConfig
) -> EvalResult:
    """Evaluate a registered policy on ``task`` (``config.env``, ``config.eval_episodes``) and record it."""
    return _record_evaluation(store, _evaluate(policy, task, config))


def _evaluate(policy: VLAPolicy, task: str, config: BCConfig) -> EvalResult:
    result, _ = evaluate(policy, config.env.env(task), config.eval_episodes)
    return result


def _record_evaluation(store: ExperienceStore, result: EvalResult) -> EvalResult:
    """Write ``result`` (an evaluation of a registered version) to the store's evaluations."""
    store.write_evaluation(
        result.policy_version, result.task, result.n, result.successes, metrics=result.as_metrics()
    )
    return result
