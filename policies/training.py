"""Behaviour-cloning training of the built-in VLA over an in-memory numpy dataset.

Generic on purpose: the lead turns store episodes into :class:`EpisodeArrays`; :func:`build_dataset` cuts them into
chunk targets (chunk at t = actions[t:t+H], padded at the end by repeating the last action, with a mask);
:func:`create_policy` fits the prompt tokenizer, the normalization statistics and (with Knowledge Insulation) the
FAST tokenizer on the dataset; :func:`train_bc` runs AdamW over minibatches with a progress bar, a periodic
evaluation callback and condition dropout (RECAP trains "Advantage: …" text with 30% dropout).

Optional per-step loss ``weights`` (filtered BC, advantage-weighted regression): the weight of step t weighs the
chunk sample at t. Minibatches are drawn uniformly from the samples with weight > 0 (so weight 0 excludes a sample
exactly: training equals training on the filtered dataset) and the flow-matching loss is the weighted mean.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from policies.device import autocast, resolve_device
from policies.fast import FASTTokenizer
from policies.normalization import NormalizationStats
from policies.train_state import STATE_FILE, TrainStateError, capture_rng, load_state, restore_rng, save_state
from policies.vla.config import VLAConfig
from policies.vla.model import VLAModel, sample_tau
from policies.vla.policy import VLAInputError, VLAPolicy, join_prompt
from policies.vla.prompt_tokenizer import train_prompt_tokenizer

#: ``callback(step, policy) -> metrics`` run every ``eval_every`` steps and after the last one.
EvalCallback = Callable[[int, VLAPolicy], dict[str, float] | None]


@dataclass
class EpisodeArrays:
    """One episode as arrays (T steps): images per camera ``T×S×S×3`` uint8, ``state`` ``T×S``, ``actions``
    ``T×D``, the task ``prompt``, an optional per-step ``conditions`` text (e.g. "Advantage: positive") and
    optional per-step loss ``weights`` ``T`` (≥ 0; 0 drops the step)."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    actions: np.ndarray
    prompt: str
    conditions: list[str | None] | None = None
    weights: np.ndarray | None = None


@dataclass
class BCDataset:
    """N training samples: images per camera ``N×S×S×3`` uint8, ``state`` ``N×S``, ``prompts`` (N), ``actions``
    ``N×H×D`` chunk targets, ``action_mask`` ``N×H`` (False on end-of-episode padding), optional ``conditions``
    and optional per-sample loss ``weights`` ``N`` (finite, ≥ 0, at least one > 0)."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    prompts: list[str]
    actions: np.ndarray
    action_mask: np.ndarray
    conditions: list[str | None] | None = None
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def validate(self, config: VLAConfig, images: bool = True) -> None:
        """Raise :class:`VLAInputError` naming the field if the data does not match ``config`` (``images=False``
        skips the image checks: a dataset without images can fit tokenizers and statistics, not train)."""
        n, side, horizon = len(self), config.image_size, config.action_horizon
        for camera in config.cameras if images else ():
            if camera not in self.images:
                raise VLAInputError(
                    f"images[{camera!r}]: missing camera, expected cameras {list(config.cameras)}"
                )
            array = self.images[camera]
            if array.dtype != np.uint8 or array.shape != (n, side, side, 3):
                raise VLAInputError(
                    f"images[{camera!r}]: expected uint8 ({n}, {side}, {side}, 3), got {array.dtype} {array.shape}"
                )
        expected = {
            "state": (self.state, (n, config.state_dim)),
            "actions": (self.actions, (n, horizon, config.action_dim)),
            "action_mask": (self.action_mask, (n, horizon)),
        }
        for name, (array, shape) in expected.items():
            if array.shape != shape:
                raise VLAInputError(f"{name}.shape: expected {shape}, got {array.shape}")
        if self.conditions is not None and len(self.conditions) != n:
            raise VLAInputError(
                f"conditions: expected {n} entries (one per sample), got {len(self.conditions)}"
            )
        if self.weights is not None:
            validate_weights(self.weights, n, "weights")


def validate_weights(weights: np.ndarray, n: int, name: str) -> None:
    """Raise :class:`VLAInputError` unless ``weights`` is ``n`` finite non-negative numbers, not all zero."""
    array = np.asarray(weights)
    if array.shape != (n,):
        raise VLAInputError(f"{name}.shape: expected ({n},) (one weight per step), got {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise VLAInputError(f"{name}: expected finite numbers, got NaN/inf or a non-numeric dtype")
    if (array < 0).any():
        raise VLAInputError(f"{name}: expected weights >= 0, got minimum {array.min():g}")
    if not (array > 0).any():
        raise VLAInputError(f"{name}: every weight is 0, nothing to train on")


def chunk_episode(actions: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk targets ``T×H×D`` (chunk t = actions[t:t+H], end padded with the last action) and mask ``T×H``."""
    actions = np.asarray(actions, dtype=np.float32)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise VLAInputError(f"actions.shape: expected (T, D) with T > 0, got {actions.shape}")
    steps = actions.shape[0]
    index = np.arange(steps)[:, None] + np.arange(horizon)[None, :]
    return actions[np.minimum(index, steps - 1)], index < steps


def build_dataset(episodes: Sequence[EpisodeArrays], horizon: int) -> BCDataset:
    """Concatenate episodes into one :class:`BCDataset` of chunk targets."""
    if not episodes:
        raise VLAInputError("episodes: expected at least one episode, got none")
    cameras = sorted(episodes[0].images)
    chunks, masks = zip(*(chunk_episode(episode.actions, horizon) for episode in episodes), strict=True)
    use_conditions = any(episode.conditions is not None for episode in episodes)
    conditions: list[str | None] | None = [] if use_conditions else None
    use_weights = any(episode.weights is not None for episode in episodes)
    weights: list[np.ndarray] = []
    for index, episode in enumerate(episodes):
        steps = len(episode.actions)
        if sorted(episode.images) != cameras:
            raise VLAInputError(
                f"episodes[{index}].images: expected cameras {cameras}, got {sorted(episode.images)}"
            )
        lengths = {name: len(array) for name, array in episode.images.items()} | {"state": len(episode.state)}
        if any(length != steps for length in lengths.values()):
            raise VLAInputError(
                f"episodes[{index}]: expected {steps} steps everywhere (actions), got {lengths}"
            )
        if conditions is not None:
            conditions += episode.conditions if episode.conditions is not None else [None] * steps
        if use_weights:
            weights.append(_episode_weights(episode, index, steps))
    return BCDataset(
        images={
            camera: np.concatenate([episode.images[camera] for episode in episodes]) for camera in cameras
        },
        state=np.concatenate([np.asarray(episode.state, dtype=np.float32) for episode in episodes]),
        prompts=[episode.prompt for episode in episodes for _ in range(len(episode.actions))],
        actions=np.concatenate(chunks),
        action_mask=np.concatenate(masks),
        conditions=conditions,
        weights=np.concatenate(weights) if use_weights else None,
    )


def _episode_weights(episode: EpisodeArrays, index: int, steps: int) -> np.ndarray:
    """The episode's per-step weights (1 when it has none), checked for length and sign."""
    if episode.weights is None:
        return np.ones(steps, dtype=np.float32)
    array = np.asarray(episode.weights, dtype=np.float32)
    if array.shape != (steps,):
        raise VLAInputError(
            f"episodes[{index}].weights.shape: expected ({steps},) (one weight per step), got {array.shape}"
        )
    if not np.isfinite(array).all() or (array < 0).any():
        raise VLAInputError(f"episodes[{index}].weights: expected finite weights >= 0")
    return array


def create_policy(
    config: VLAConfig, dataset: BCDataset, seed: int = 0, fast_vocab_size: int = 512, **policy_kwargs
) -> VLAPolicy:
    """A fresh :class:`VLAPolicy` whose tokenizers and normalization statistics are fitted on ``dataset``.

    ``config.vocab_size`` (and ``fast_vocab_size`` under Knowledge Insulation) are replaced by the fitted sizes.
    """
    prompts = sorted(set(dataset.prompts) | {c for c in dataset.conditions or [] if c})
    prompt_tokenizer = train_prompt_tokenizer(prompts, vocab_size=config.vocab_size)
    fast_tokenizer = None
    if config.knowledge_insulation:
        fast_tokenizer = FASTTokenizer.fit(dataset.actions, vocab_size=fast_vocab_size)
    config = dataclasses.replace(
        config,
        vocab_size=prompt_tokenizer.get_vocab_size(),
        fast_vocab_size=fast_tokenizer.vocab_size if fast_tokenizer else config.fast_vocab_size,
    )
    dataset.validate(
        config, images=bool(dataset.images)
    )  # no images: a data-parallel driver, workers load them
    norm_stats = NormalizationStats.compute(dataset.state, dataset.actions, mode=config.normalization)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    return VLAPolicy(
        VLAModel(config), prompt_tokenizer, norm_stats, fast_tokenizer, seed=seed, **policy_kwargs
    )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train_bc`.

    ``condition_dropout``: probability of dropping a sample's condition text (training the unconditioned policy
    for classifier-free guidance). ``image_shift``: random-shift augmentation in pixels (0 = off).
    ``batch_size`` and ``learning_rate`` are global: under data parallelism each of the N workers takes
    ``batch_size / N`` samples and DDP averages the gradients, so the update does not depend on N.
    ``device`` is ``cpu``/``cuda``/``mps``/``auto`` (:mod:`policies.device`); ``bf16`` runs the forward pass
    under bfloat16 autocast where the device supports it. With ``state_dir`` the full training state is written
    there every ``checkpoint_every`` steps and at the end (:mod:`policies.train_state`) and a run that finds one
    continues from it.

    Convergence rule (with a ``validation`` dataset given to :func:`train_bc`): every ``validate_every`` steps the
    held-out flow loss is measured (fixed noise and flow times, conditions without dropout, the samples' own loss
    weights); training stops after ``patience`` measurements without improvement (0 = run all ``steps``), but not
    before step ``min_steps``, and the weights of the best measurement are restored — one rule for every arm (BC,
    filtered BC, AWR, RECAP). ``min_steps`` None is half of ``steps``: the warmup-cosine schedule spans ``steps``,
    and in its first half the learning rate is high enough that the held-out loss of successive checkpoints
    fluctuates by more than it improves, so a short patience stops there on noise (0 = may stop at any step).
    ``smoothing`` α ∈ [0, 1) compares an exponential moving average of the held-out loss (:class:`EarlyStopping`;
    0 = the raw measurements).

    ``schedule_steps``: the length the warmup-cosine learning-rate schedule spans (None = ``steps``). Set it
    apart from ``steps`` and the learning rate at a step no longer depends on the cap: a run of N steps is then
    the first N steps of any longer one, so arms stopped at different steps are compared on one schedule.
    ``ema_decay`` d > 0 keeps an exponential moving average of the weights, ``ā ← d·ā + (1 − d)·w`` after every
    update (``torch.optim.swa_utils``): the held-out loss, the evaluations and the weights returned are the
    average's (under the convergence rule, the average at the best measurement). 0 = the raw weights.
    """

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    condition_dropout: float = 0.0
    image_shift: int = 4
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    device: str = "cpu"
    bf16: bool = False
    checkpoint_every: int = 0
    state_dir: Path | None = None
    validate_every: int = 50
    patience: int = 0
    min_steps: int | None = None
    smoothing: float = 0.0
    schedule_steps: int | None = None
    ema_decay: float = 0.0

    def stop_floor(self) -> int:
        """The first step the convergence rule may stop at (``min_steps``; None: half of ``steps``)."""
        return self.steps // 2 if self.min_steps is None else self.min_steps


@dataclass
class TrainResult:
    """Loss history (one dict per ``log_every`` steps: step, and loss, flow_loss, fast_loss averaged over the
    steps since the previous record and, under data parallelism, over workers; ``elapsed_s`` since this
    process's loop started, evaluations included), the callback's evaluations, the
    step a resumed run started after (0 = fresh) and the device it ran on. With a validation set:
    ``validation`` (step, heldout_flow_loss and the rule's smoothed loss per measurement), ``best_step`` (whose weights the model holds) and
    ``stopped_at`` (the last step trained)."""

    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    device: str = "cpu"
    validation: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_at: int | None = None
    window: torch.Tensor = field(default_factory=lambda: torch.zeros(3), repr=False)

    def history_step(self) -> int:
        """The step of the last record (0 before the first)."""
        return int(self.history[-1]["step"]) if self.history else 0


class _BCLoss(torch.nn.Module):
    """The training objective as one ``forward`` (what DDP wraps): flow matching, plus FAST under KI."""

    def __init__(self, model: VLAModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixels: torch.Tensor,
        tokens: torch.Tensor,
        token_valid: torch.Tensor,
        state: torch.Tensor,
        actions: torch.Tensor,
        action_mask: torch.Tensor,
        noise: torch.Tensor,
        tau: torch.Tensor,
        weights: torch.Tensor | None,
        fast_tokens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.model.encode_prefix(pixels, tokens, token_valid)
        flow = self.model.flow_loss(prefix, state, actions, action_mask, noise, tau, weights).float()
        if fast_tokens is None:
            return flow, torch.zeros((), device=flow.device)
        return flow, self.model.fast_loss(prefix, fast_tokens).float()


@dataclass(frozen=True)
class _Workers:
    """This process's place among the data-parallel workers (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> _Workers:
        distributed = torch.distributed
        if distributed.is_available() and distributed.is_initialized():
            return cls(distributed.get_rank(), distributed.get_world_size())
        return cls()

    def seed(self, seed: int) -> list[int] | int:
        """Rank 0 keeps ``seed`` (so one worker draws what a single process draws); others get their own."""
        return seed if self.rank == 0 else [seed, self.rank]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over workers (itself for one)."""
        if self.size > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.size
        return values

    def gather(self, value: object) -> list[object]:
        """Every worker's ``value``, by rank."""
        if self.size == 1:
            return [value]
        gathered: list[object] = [None] * self.size
        torch.distributed.all_gather_object(gathered, value)
        return gathered


class HeldOutLoss:
    """The flow loss of a held-out dataset under fixed noise and flow times (comparable across measurements):
    prompts carry their conditions (no dropout), samples weigh by their loss weights (weight 0 is left out)."""

    def __init__(self, policy: VLAPolicy, dataset: BCDataset, seed: int = 0, batch_size: int = 256) -> None:
        keep = np.arange(len(dataset)) if dataset.weights is None else np.flatnonzero(dataset.weights > 0)
        if keep.size == 0:
            raise VLAInputError("validation: no held-out sample has a loss weight > 0")
        self.policy, self.batch_size = policy, batch_size
        self.data = _device_data(policy, dataset, torch.device("cpu"))
        self.index = torch.from_numpy(keep)
        conditions = dataset.conditions or [None] * len(dataset)
        self.prompts = [join_prompt(dataset.prompts[i], conditions[i]) for i in keep]
        self.weights = (
            None if dataset.weights is None else torch.from_numpy(dataset.weights.astype(np.float32))
        )
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(self.data["actions"][self.index].shape, generator=generator)
        self.tau = sample_tau(len(keep), generator)

    @torch.no_grad()
    def __call__(self) -> float:
        """The weighted mean flow loss over the held-out samples."""
        model, device = self.policy.model, self.policy.device
        was_training = model.training
        model.eval()
        total, mass = 0.0, 0.0
        for start in range(0, len(self.index), self.batch_size):
            rows = self.index[start : start + self.batch_size]
            part = slice(start, start + len(rows))
            tokens, valid = self.policy.tokenize(self.prompts[part], trim=True)
            pixels = self.data["images"][rows].float() / 127.5 - 1.0
            weights = self.weights[rows] if self.weights is not None else torch.ones(len(rows))
            mask = self.data["action_mask"][rows]
            inputs = [pixels, tokens, valid, self.data["state"][rows], self.data["actions"][rows]]
            inputs = [t.to(device) for t in [*inputs, mask, self.noise[part], self.tau[part], weights]]
            prefix = model.encode_prefix(*inputs[:3])
            loss = model.flow_loss(prefix, *inputs[3:]).float().item()
            batch_mass = float((mask.float() * weights[:, None]).sum())
            total, mass = total + loss * batch_mass, mass + batch_mass
        model.train(was_training)
        return total / mass


@dataclass
class EarlyStopping:
    """The convergence rule's state: the best (smoothed) held-out loss so far, its step and weights, how many
    measurements have not improved on it, and the running smoothed loss.

    With ``smoothing`` α > 0 the rule compares an exponential moving average ``s ← α·s + (1 − α)·loss`` instead of
    the raw measurements: while the learning rate is high the weights of successive checkpoints fluctuate, and the
    lowest raw measurement so far is a lucky draw that later checkpoints rarely beat, even on a falling trend."""

    best_loss: float = math.inf
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    stale: int = 0
    smoothed: float | None = None

    def update(
        self, step: int, loss: float, model: torch.nn.Module | None = None, smoothing: float = 0.0
    ) -> float:
        """Record a measurement (keep a copy of ``model``'s weights when it is the best); the smoothed loss."""
        previous = loss if self.smoothed is None else self.smoothed
        self.smoothed = smoothing * previous + (1.0 - smoothing) * loss
        if self.smoothed < self.best_loss:
            self.best_loss, self.best_step, self.stale = self.smoothed, step, 0
            if model is not None:
                self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.stale += 1
        return self.smoothed

    def should_stop(self, step: int, patience: int, min_steps: int) -> bool:
        """True once ``patience`` (> 0) measurements have not improved and ``step`` ≥ ``min_steps``."""
        return bool(patience) and self.stale >= patience and step >= min_steps


def train_bc(
    policy: VLAPolicy,
    dataset: BCDataset,
    config: TrainConfig,
    callback: EvalCallback | None = None,
    validation: BCDataset | None = None,
) -> TrainResult:
    """Train ``policy.model`` in place on ``dataset``; returns the loss history and the callback's metrics.

    With ``validation`` (held-out episodes) the convergence rule of :class:`TrainConfig` applies: held-out flow
    loss every ``validate_every`` steps, stop after ``patience`` measurements without improvement (not before
    :meth:`TrainConfig.stop_floor`), the best weights restored (the last ``callback`` evaluates them). Single-process only.

    Under ``torch.distributed`` (one Ray Train worker per rank) ``dataset`` is this worker's shard: it draws
    ``batch_size / world_size`` samples per step, DDP averages the gradients, and rank 0 alone writes the
    training state and runs ``callback``.
    """
    dataset.validate(policy.config)
    device = resolve_device(config.device)
    workers = _Workers.current()
    if config.batch_size % workers.size:
        raise VLAInputError(
            f"batch_size: the global batch {config.batch_size} must divide among {workers.size} workers"
        )
    policy.to(device)
    model = policy.model
    rng = np.random.default_rng(workers.seed(config.seed))
    generator = torch.Generator().manual_seed(
        config.seed if workers.rank == 0 else config.seed + 7919 * workers.rank
    )
    data = _device_data(policy, dataset, device)
    support, sample_weights = _weighted_support(dataset, policy.config.knowledge_insulation)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    horizon = config.schedule_steps or config.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, horizon))
    average = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)) if config.ema_decay else None
    )
    result = TrainResult(device=str(device))
    stopping = EarlyStopping() if validation is not None else None
    if validation is not None:
        if workers.size > 1:
            raise VLAInputError("validation: early stopping runs in one process (train_workers = 1)")
        validation.validate(policy.config)
        heldout = HeldOutLoss(policy, validation, seed=config.seed)
    state = _TrainingState(model, optimizer, schedule, rng, generator, result, stopping, average)
    start = state.resume(config, workers)
    objective = _BCLoss(model)
    if workers.size > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    batch = min(config.batch_size // workers.size, len(support))
    window = result.window  # loss, flow and FAST losses summed since the last record
    model.train()
    bar = tqdm(
        range(start + 1, config.steps + 1),
        initial=start,
        total=config.steps,
        disable=not config.progress or workers.rank != 0,
        desc="train bc",
        unit="step",
    )
    postfix: dict[str, str] = {}  # the latest loss and evaluation, shown next to the bar
    started = time.perf_counter()
    step = start
    for step in bar:
        index = support[torch.from_numpy(rng.integers(0, len(support), size=batch))]
        prompts = _batch_prompts(dataset, index.numpy(), config.condition_dropout, rng)
        tokens, token_valid = policy.tokenize(prompts, trim=True)
        pixels = _augment(data["images"][index].float() / 127.5 - 1.0, config.image_shift, generator)
        noise = torch.randn(data["actions"][index].shape, generator=generator)
        tau = sample_tau(len(index), generator)
        weights = sample_weights[index] if sample_weights is not None else None
        inputs = [pixels, tokens, token_valid, data["state"][index], data["actions"][index]]
        inputs += [data["action_mask"][index], noise, tau, weights]
        inputs += [data["fast"][index] if data["fast"] is not None else None]
        with autocast(device, config.bf16):
            flow, fast = objective(*[_to(t, device) for t in inputs])
        loss = flow + fast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        if average is not None:
            average.update_parameters(model)
        window += torch.stack([loss.detach(), flow.detach(), fast.detach()]).cpu()
        if step % config.log_every == 0 or step == config.steps:
            mean = workers.mean(window / (step - result.history_step()))
            window.zero_()
            record = {
                "step": step,
                "loss": mean[0].item(),
                "flow_loss": mean[1].item(),
                "fast_loss": mean[2].item(),
                "elapsed_s": time.perf_counter() - started,
            }
            result.history.append(record)
            postfix["loss"] = f"{record['loss']:.4f}"
            bar.set_postfix(postfix)
        stop = False
        if stopping is not None and (step % config.validate_every == 0 or step == config.steps):
            with averaged_weights(model, average):
                loss_value = heldout()
                smoothed = stopping.update(step, loss_value, model, config.smoothing)
            result.validation.append({"step": step, "heldout_flow_loss": loss_value, "smoothed": smoothed})
            postfix["heldout"] = f"{loss_value:.4f}"
            stop = stopping.should_stop(step, config.patience, config.stop_floor())
        final = step == config.steps or stop
        if (
            callback is not None
            and workers.rank == 0
            and ((config.eval_every and step % config.eval_every == 0 and not final) or final)
            and not (final and stopping is not None)  # the best weights are evaluated after the loop
        ):
            model.eval()
            with averaged_weights(model, average):
                metrics = callback(step, policy)
            model.train()
            if metrics:
                result.evaluations.append({"step": step, **metrics})
                postfix |= {"eval_step": str(step)} | {key: f"{value:.2f}" for key, value in metrics.items()}
                bar.set_postfix(postfix)
        if config.state_dir is not None and (
            final or (config.checkpoint_every and step % config.checkpoint_every == 0)
        ):
            state.save(config, workers, step)
        if stop:
            break
    bar.close()
    model.eval()
    if average is not None:
        model.load_state_dict(_parameters_of(average), strict=False)
    if stopping is not None and stopping.best_weights is not None:
        model.load_state_dict(stopping.best_weights)
        result.best_step, result.stopped_at = stopping.best_step, step
        if callback is not None:
            metrics = callback(step, policy)
            if metrics:
                result.evaluations.append({"step": step, "best_step": stopping.best_step, **metrics})
    return result


@contextmanager
def averaged_weights(model: torch.nn.Module, average: AveragedModel | None) -> Iterator[None]:
    """Inside the block ``model`` holds ``average``'s parameters (nothing changes when it is None); its own
    training weights come back after."""
    if average is None:
        yield
        return
    live = {name: value.detach().clone() for name, value in model.named_parameters()}
    model.load_state_dict(_parameters_of(average), strict=False)
    try:
        yield
    finally:
        model.load_state_dict(live, strict=False)


def _parameters_of(average: AveragedModel) -> dict[str, torch.Tensor]:
    """The averaged parameters under the averaged model's own names."""
    return dict(average.module.named_parameters())


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def _device_data(
    policy: VLAPolicy, dataset: BCDataset, device: torch.device
) -> dict[str, torch.Tensor | None]:
    """The dataset as CPU tensors (pinned when feeding a GPU, so batch copies overlap compute)."""
    cameras, side = policy.config.cameras, policy.config.image_size
    images = (
        np.stack([dataset.images[c] for c in cameras], axis=1)
        if cameras
        else np.zeros((len(dataset), 0, side, side, 3), dtype=np.uint8)  # the state tier reads no images
    )
    data = {
        "images": torch.from_numpy(images).permute(0, 1, 4, 2, 3),
        "state": torch.from_numpy(
            policy.norm_stats.state.normalize(dataset.state, policy.config.normalization)
        ),
        "actions": policy.normalize_actions(dataset.actions),
        "action_mask": torch.from_numpy(dataset.action_mask),
        "fast": _fast_targets(policy, dataset) if policy.config.knowledge_insulation else None,
    }
    if device.type == "cuda":
        data = {key: value.pin_memory() if value is not None else None for key, value in data.items()}
    return data


def _state_file(config: TrainConfig) -> Path:
    assert config.state_dir is not None
    return Path(config.state_dir) / STATE_FILE


@dataclass
class _TrainingState:
    """Everything a resumed ``train_bc`` needs: weights, optimizer, schedule, random streams and results."""

    model: VLAModel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    generator: torch.Generator
    result: TrainResult
    stopping: EarlyStopping | None = None
    average: AveragedModel | None = None

    def resume(self, config: TrainConfig, workers: _Workers) -> int:
        """Load the state in ``config.state_dir`` if there is one; the step it was written at (0 if none)."""
        state = None if config.state_dir is None else load_state(_state_file(config))
        if state is None:
            return 0
        if state["steps"] != config.steps:
            raise TrainStateError(
                f"{_state_file(config)}: written by a run of {state['steps']} steps, this one has {config.steps}"
            )
        self.model.load_state_dict(state["model"])
        if self.average is not None and state.get("average") is not None:
            self.average.load_state_dict(state["average"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if workers.rank < len(
            state["rng"]
        ):  # a different worker count keeps rank 0's record, not the streams
            restore_rng(state["rng"][workers.rank], self.rng, self.generator)
            self.result.window.copy_(state["window"][workers.rank])
        self.result.history = list(state["history"])
        self.result.evaluations = list(state["evaluations"])
        self.result.resumed_from = int(state["step"])
        if self.stopping is not None and state.get("early_stopping") is not None:
            for name, value in state["early_stopping"].items():
                setattr(self.stopping, name, value)
            self.result.validation = list(state.get("validation", []))
        return self.result.resumed_from

    def save(self, config: TrainConfig, workers: _Workers, step: int) -> None:
        """Rank 0 writes the training state after ``step`` (every rank's random state included)."""
        gathered = workers.gather((capture_rng(self.rng, self.generator), self.result.window.clone()))
        if workers.rank != 0:
            return
        save_state(
            _state_file(config),
            {
                "model": self.model.state_dict(),
                "average": None if self.average is None else self.average.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "rng": [rng_state for rng_state, _ in gathered],
                "window": [window for _, window in gathered],
                "step": step,
                "steps": config.steps,
                "world_size": workers.size,
                "device": self.result.device,
                "history": self.result.history,
                "evaluations": self.result.evaluations,
                "early_stopping": None if self.stopping is None else dataclasses.asdict(self.stopping),
                "validation": self.result.validation,
            },
        )


def _weighted_support(
    dataset: BCDataset, knowledge_insulation: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of the samples to draw from (weight > 0) and the loss weights (None when all are equal)."""
    if dataset.weights is None:
        return torch.arange(len(dataset)), None
    weights = np.asarray(dataset.weights, dtype=np.float32)
    support = np.flatnonzero(weights > 0)
    if np.ptp(weights[support]) == 0:
        return torch.from_numpy(support), None
    if knowledge_insulation:
        raise VLAInputError(
            "weights: unequal loss weights are not supported with knowledge_insulation (the FAST loss is "
            "unweighted); use 0/1 weights"
        )
    return torch.from_numpy(support), torch.from_numpy(weights)


def _batch_prompts(
    dataset: BCDataset, index: np.ndarray, dropout: float, rng: np.random.Generator
) -> list[str]:
    if dataset.conditions is None:
        return [dataset.prompts[i] for i in index]
    keep = rng.random(len(index)) >= dropout
    return [
        join_prompt(dataset.prompts[i], dataset.conditions[i] if k else None)
        for i, k in zip(index, keep, strict=True)
    ]


def _augment(pixels: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random shift (pad by replication, random crop) per sample and camera, as in DrQ."""
    if shift <= 0 or pixels.shape[1] == 0:
        return pixels
    b, c, ch, h, w = pixels.shape
    flat = torch.nn.functional.pad(pixels.reshape(b * c, ch, h, w), (shift,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (b * c,), generator=generator)
    dy = torch.randint(0, 2 * shift + 1, (b * c,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(-1, ch, -1, w + 2 * shift)
    cropped = flat.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(-1, ch, h, -1)
    return cropped.gather(3, cols).reshape(b, c, ch, h, w)


def _fast_targets(policy: VLAPolicy, dataset: BCDataset) -> torch.Tensor:
    """FAST ids + EOS per sample, PAD-padded (truncated at ``max_fast_tokens``) as an ``N×L`` tensor."""
    assert policy.fast_tokenizer is not None  # guaranteed by check_components under knowledge_insulation
    _, eos, pad = policy.model.fast_special
    length = policy.config.max_fast_tokens
    targets = torch.full((len(dataset), length), pad, dtype=torch.long)
    for row, ids in enumerate(policy.fast_tokenizer.encode(dataset.actions)):
        sequence = [*ids, eos][:length]
        targets[row, : len(sequence)] = torch.tensor(sequence)
    return targets


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
