"""Typed, validated settings of the RECAP learner core (frozen pydantic models; unknown fields are errors)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.device import DeviceName

#: Built-in encoders that read a camera (``ValueConfig.camera`` selects it; without a camera no images are read).
IMAGE_ENCODERS = ("image_conv", "vla_image")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardConfig(_Frozen):
    """Rewards from episode outcomes: −1 per step, 0 at the success step, −``fail_penalty`` on failure.

    ``fail_penalty=None`` makes a failure cost as much as a full-length episode of its task.
    ``max_episode_length`` gives each task's horizon (one int for all tasks, or a task → int map); ``None``
    (or a task missing from the map) falls back to the task's longest episode in the data (recorded).
    """

    fail_penalty: float | None = Field(default=None, ge=0.0)
    max_episode_length: int | dict[str, int] | None = None

    @model_validator(mode="after")
    def _positive_lengths(self) -> Self:
        lengths = self.max_episode_length
        values = lengths.values() if isinstance(lengths, dict) else [] if lengths is None else [lengths]
        if any(value < 1 for value in values):
            raise ValueError(f"max_episode_length must be ≥ 1 for every task, got {lengths}")
        return self


class ValueConfig(_Frozen):
    """Distributional value model V(o, task) and its training.

    ``inputs`` selects the per-step vector: the policy's proprio ``state``, the simulator's ``privileged``
    state, or both. ``time_feature`` appends t / max_episode_length (returns under a time limit depend on it).
    ``encoder`` names a registered observation encoder (``state_mlp`` default; ``image_conv`` / ``vla_image``
    add a conv net over ``camera``). Images are read only when ``camera`` is set. ``target`` is the bin
    encoding of the return (two-hot or nearest bin). ``device`` is where it trains and runs (``cpu``, ``cuda``,
    ``mps`` or ``auto``, :mod:`policies.device`); ``train_workers`` > 1 trains data-parallel on Ray Train (the
    pipeline's relabel stage, :mod:`experiments.distributed`). Neither changes the model's version.
    ``reward`` defines the returns the model learns. ``validation_fraction`` of each task's training episodes
    is held out for early stopping (the best held-out loss, checked every ``eval_every`` steps, wins).
    """

    reward: RewardConfig = RewardConfig()
    num_bins: int = Field(default=201, ge=2)
    inputs: Literal["state", "privileged", "state_privileged"] = "state"
    time_feature: bool = True
    encoder: str = "state_mlp"
    camera: str | None = None
    image_size: int = Field(default=64, ge=8)
    hidden_dim: int = Field(default=256, ge=1)
    num_layers: int = Field(default=2, ge=1)
    task_embedding_dim: int = Field(default=16, ge=1)
    ensemble_size: int = Field(default=1, ge=1)
    target: Literal["two_hot", "nearest"] = "two_hot"
    train_steps: int = Field(default=1500, ge=1)
    validation_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    eval_every: int = Field(default=100, ge=1)
    batch_size: int = Field(default=256, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    inference_batch_size: int = Field(default=4096, ge=1)
    seed: int = 0
    device: DeviceName = "auto"
    train_workers: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _workers_fit(self) -> Self:
        if self.batch_size % self.train_workers:
            raise ValueError(
                f"train_workers: the global batch_size {self.batch_size} must divide among {self.train_workers}"
            )
        return self

    @model_validator(mode="after")
    def _camera_for_images(self) -> Self:
        if self.encoder in IMAGE_ENCODERS and not self.camera:
            raise ValueError(f"ValueConfig.camera must name a camera when encoder={self.encoder!r}")
        return self


#: Bounds of the N-step window chosen from a task's horizon H (``AdvantageConfig.window``): N = H / 10, clipped.
MIN_WINDOW, MAX_WINDOW = 10, 25

#: How advantage indicators become condition text: ``explicit`` ("Advantage: positive" / "Advantage: negative"
#: on every step) or ``positive_only`` (positive steps get "Advantage: positive", negative steps no text: they
#: train the unconditioned policy, as RLinf does).
Conditioning = Literal["explicit", "positive_only"]


class AdvantageConfig(_Frozen):
    """Advantage estimate and the per-task indicator threshold.

    ``phase`` sets the defaults the π*0.6 recipe uses: ``finetune`` (per-iteration rollouts) → N-step
    advantages and 40% positive; ``pretrain`` (demonstration/pretraining data) → Monte-Carlo advantages and
    30% positive.
    ``n_step`` is N; ``None`` (default) chooses it from the task's horizon H: round(H / 10) clipped to
    [``MIN_WINDOW``, ``MAX_WINDOW``] (15 for 150-step episodes), so a window does not reach the failure terminal
    for a third of every failed episode. A window stops at the episode's end (no bootstrap past it) and, with
    ``stop_at_source_change``, where the step source changes (policy ↔ human): it then bootstraps from V at the
    first step of the other source, so a stall is not credited with the human's progress (nor the reverse).
    ``positive_fraction`` is the share of autonomous (non-intervention) steps of each task labelled positive;
    intervention steps are positive regardless when ``interventions_positive``, and every step of a
    demonstration (an episode the learned policy did not produce: a scripted expert's or all-human) when
    ``demonstrations_positive``; forced steps do not count toward the threshold. Defaults are resolved at
    construction: build a new ``AdvantageConfig(phase=...)`` rather than ``model_copy`` to switch phase.
    """

    phase: Literal["finetune", "pretrain"] = "finetune"
    estimator: Literal["n_step", "monte_carlo"] | None = None
    n_step: int | None = Field(default=None, ge=1)
    stop_at_source_change: bool = True
    positive_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    interventions_positive: bool = True
    demonstrations_positive: bool = False

    def window(self, horizon: int) -> int:
        """N for a task with horizon ``horizon``: ``n_step`` if set, else round(H / 10) in [10, 25]."""
        if self.n_step is not None:
            return self.n_step
        return int(min(MAX_WINDOW, max(MIN_WINDOW, round(horizon / 10))))

    @model_validator(mode="after")
    def _phase_defaults(self) -> Self:
        finetune = self.phase == "finetune"
        if self.estimator is None:
            object.__setattr__(self, "estimator", "n_step" if finetune else "monte_carlo")
        if self.positive_fraction is None:
            object.__setattr__(self, "positive_fraction", 0.4 if finetune else 0.3)
        return self


class SanityFloor(_Frozen):
    """Minimum label quality: below any floor a relabel warns loudly and sets ``diagnostics['sanity_ok']``
    to False. ``None`` disables a check.

    Judged on tasks (and the pooled data) that contain both successes and failures:

    - ``positive_gap`` ≥ ``min_positive_gap``: P(pos | success step) − P(pos | failure step) over autonomous
      steps — the labels tell successful from failed episodes (in-sample labels in an early probe had 0.09,
      cross-fitted 0.39; shuffled labels ≈ 0).
    - ``value_episode_rank`` ≥ ``min_value_episode_rank``: within an episode, held-out V ranks the steps as the
      return does (Spearman, mean over episodes). An N-step advantage uses V only through differences inside
      one episode, so this is what the labels need from V; a constant or shuffled value scores ≈ 0.
      The correlation of V with the return *across* episodes (``min_value_correlation``, off by default) also
      measures calibration between episodes, which the labels do not use: it flagged the best labels measured
      (reach-v3, privileged value: corr 0.06 in the benchmark whose RECAP went 0.46 → 0.92; 0.17 on a fresh
      collection of the shipped configs/reach-recap.yaml, whose labels pass this floor — tests/test_label_diagnostics.py).

    And on every group whose steps carry injected ground truth (``EpisodeRecord.injected``): ``label_auc`` ≥
    ``min_label_auc`` — the advantage ranks clean autonomous steps above injected bad ones (0.5 = blind).
    The AUC of V(o_0) for success is off by default: when failures come from the policy's own randomness the
    first observation cannot predict them, however good the labels.
    """

    min_positive_gap: float | None = 0.1
    min_value_episode_rank: float | None = 0.2
    min_label_auc: float | None = 0.6
    min_first_step_auc: float | None = None
    min_value_correlation: float | None = None


class RelabelConfig(_Frozen):
    """Everything ``relabel`` needs: value model (with its rewards), advantage, cross-fitting, sanity floor.

    Episodes are split into ``k_folds`` folds (stratified by task and success, shuffled with ``fold_seed``);
    each fold is relabeled by a value model trained on the other folds only.
    """

    value: ValueConfig = ValueConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    sanity: SanityFloor = SanityFloor()
    k_folds: int = Field(default=2, ge=2)
    fold_seed: int = 0
