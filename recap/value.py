"""Distributional value model V(o, task): a categorical distribution over the normalized return's bins.

``train_value`` fits it by cross-entropy to the binned Monte-Carlo return of every step; ``ValueModel``
predicts the full distribution and its expectation per step of an episode. It remembers which episodes it
was trained on (``training_uuids``) so relabeling can refuse to label them, and carries its own input
normalization.
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.types import monte_carlo_returns
from policies.device import resolve_device
from policies.train_state import capture_rng, load_state, restore_rng, save_state
from recap.bins import ReturnBins
from recap.config import ValueConfig
from recap.encoders import EncoderSpec, ObservationEncoder, build_encoder
from recap.rewards import RecapInputError, check_learnable, step_rewards, task_horizons
from storage.records import EpisodeRecord


class ValueNetwork(nn.Module):
    """Encoder features + a task embedding → logits over the return bins."""

    def __init__(self, encoder: ObservationEncoder, num_tasks: int, config: ValueConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.task_embedding = nn.Embedding(num_tasks, config.task_embedding_dim)
        self.head = nn.Sequential(
            nn.Linear(encoder.out_dim + config.task_embedding_dim, config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, config.num_bins),
        )

    def forward(
        self, vector: torch.Tensor, image: torch.Tensor | None, task_ids: torch.Tensor
    ) -> torch.Tensor:
        features = torch.cat([self.encoder(vector, image), self.task_embedding(task_ids)], dim=-1)
        return self.head(features)


@dataclass
class StepInputs:
    """Per-step model inputs of a set of episodes, concatenated (N steps)."""

    vectors: np.ndarray
    images: np.ndarray | None
    task_ids: np.ndarray


def episode_vector(episode: EpisodeRecord, config: ValueConfig, horizon: int) -> np.ndarray:
    """The T×F input vector of an episode: chosen state parts, plus t / horizon if ``time_feature``."""
    parts: list[np.ndarray] = []
    if config.inputs in ("state", "state_privileged"):
        parts.append(np.asarray(episode.states, dtype=np.float32).reshape(episode.length, -1))
    if config.inputs in ("privileged", "state_privileged"):
        if episode.privileged is None:
            raise RecapInputError(
                f"episode {episode.uuid}: privileged is None; ValueConfig.inputs={config.inputs!r} needs it"
            )
        parts.append(np.asarray(episode.privileged, dtype=np.float32).reshape(episode.length, -1))
    if config.time_feature:
        parts.append((np.arange(episode.length, dtype=np.float32) / horizon)[:, None])
    return np.concatenate(parts, axis=1)


def episode_images(episode: EpisodeRecord, config: ValueConfig) -> np.ndarray | None:
    """The T×H×W×3 images of the configured camera (None when the encoder reads no images)."""
    if config.camera is None:
        return None
    if config.camera not in episode.images:
        raise RecapInputError(
            f"episode {episode.uuid}: no images for camera {config.camera!r} (has {sorted(episode.images)}); "
            "load episodes with images=True or use encoder='state_mlp'"
        )
    return episode.images[config.camera]


class ValueModel:
    """A trained (ensemble of) distributional value network(s) with its task vocabulary and normalization."""

    def __init__(
        self,
        config: ValueConfig,
        tasks: list[str],
        horizons: dict[str, int],
        vector_mean: np.ndarray,
        vector_std: np.ndarray,
        training_uuids: frozenset[uuid.UUID],
    ) -> None:
        self.config = config
        self.tasks = tasks
        self.horizons = horizons
        self.vector_mean = torch.as_tensor(vector_mean, dtype=torch.float32)
        self.vector_std = torch.as_tensor(vector_std, dtype=torch.float32)
        self.training_uuids = training_uuids
        self.bins = ReturnBins(config.num_bins)
        self.training_loss: float | None = None  # held-out loss of the kept weights (else last batch loss)
        self.resumed_from_step: int | None = None  # where train_value continued an interrupted training
        spec = EncoderSpec(
            vector_dim=int(self.vector_mean.shape[0]),
            hidden_dim=config.hidden_dim,
            num_layers=config.num_layers,
            dropout=config.dropout,
            image_size=config.image_size,
            uses_images=config.camera is not None,
        )
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            self.members = nn.ModuleList(
                ValueNetwork(build_encoder(config.encoder, spec), len(tasks), config)
                for _ in range(config.ensemble_size)
            )

    @property
    def device(self) -> torch.device:
        """Where the networks run (inputs are moved there; probabilities come back to the CPU)."""
        return self.vector_mean.device

    def to(self, device: str | torch.device) -> ValueModel:
        """Move the networks and the input normalization to ``device`` (see :mod:`policies.device`)."""
        device = resolve_device(device)
        self.members.to(device)
        self.vector_mean, self.vector_std = self.vector_mean.to(device), self.vector_std.to(device)
        return self

    @property
    def version(self) -> str:
        """Identifier of this model: a hash of its config, tasks and training episodes."""
        payload = json.dumps(
            {
                "config": self.config.model_dump(mode="json", exclude={"device", "train_workers"}),
                "tasks": self.tasks,
                "horizons": self.horizons,
                "episodes": sorted(str(episode_uuid) for episode_uuid in self.training_uuids),
            },
            sort_keys=True,
        )
        return "value-" + hashlib.sha256(payload.encode()).hexdigest()[:12]

    def task_ids(self, tasks: Sequence[str]) -> np.ndarray:
        """Integer ids of task names; a task the model never saw is a clear error (no value for it)."""
        index = {task: position for position, task in enumerate(self.tasks)}
        missing = sorted({task for task in tasks if task not in index})
        if missing:
            raise RecapInputError(
                f"task {missing[0]!r}: this value model has no value for it (trained on {self.tasks}); "
                "train a value model on episodes of that task first"
            )
        return np.array([index[task] for task in tasks], dtype=np.int64)

    def step_inputs(self, episodes: Sequence[EpisodeRecord]) -> StepInputs:
        """Concatenated model inputs of every step of ``episodes``."""
        ids = self.task_ids([episode.task for episode in episodes])
        for episode in episodes:
            horizon = self.horizons[episode.task]
            if episode.length > horizon:
                raise RecapInputError(
                    f"episode {episode.uuid}: length {episode.length} exceeds the value model's horizon "
                    f"{horizon} for task {episode.task!r}"
                )
        vectors = [episode_vector(ep, self.config, self.horizons[ep.task]) for ep in episodes]
        images = [episode_images(ep, self.config) for ep in episodes]
        return StepInputs(
            vectors=np.concatenate(vectors),
            images=None if images[0] is None else np.concatenate(images),
            task_ids=np.repeat(ids, [episode.length for episode in episodes]),
        )

    def _logits(self, member: ValueNetwork, inputs: StepInputs, index: np.ndarray) -> torch.Tensor:
        device = self.device
        vector = (torch.from_numpy(inputs.vectors[index]).to(device) - self.vector_mean) / self.vector_std
        image = None if inputs.images is None else torch.from_numpy(inputs.images[index]).to(device)
        return member(vector, image, torch.from_numpy(inputs.task_ids[index]).to(device))

    @torch.no_grad()
    def member_distributions(self, inputs: StepInputs) -> np.ndarray:
        """E×N×bins probabilities of every ensemble member for every step."""
        self.members.eval()
        count = len(inputs.task_ids)
        out = np.empty((len(self.members), count, self.config.num_bins), dtype=np.float32)
        for start in range(0, count, self.config.inference_batch_size):
            index = np.arange(start, min(count, start + self.config.inference_batch_size))
            for position, member in enumerate(self.members):
                out[position, index] = torch.softmax(self._logits(member, inputs, index), -1).cpu().numpy()
        return out

    def distribution(self, episode: EpisodeRecord) -> np.ndarray:
        """T×bins distribution over the normalized return (ensemble mean) at each step of ``episode``."""
        return self.member_distributions(self.step_inputs([episode])).mean(axis=0)

    def values(self, episode: EpisodeRecord) -> np.ndarray:
        """Expected normalized return V(o_t) (length T) at each step of ``episode``."""
        return self.values_of([episode])[0]

    def values_of(self, episodes: Sequence[EpisodeRecord]) -> list[np.ndarray]:
        """Expected values of several episodes in one batched pass."""
        probabilities = self.member_distributions(self.step_inputs(episodes)).mean(axis=0)
        expected = self.bins.decode(torch.from_numpy(probabilities)).numpy()
        return np.split(expected, np.cumsum([episode.length for episode in episodes])[:-1])

    def save(self, directory: str | Path) -> Path:
        """Write weights (safetensors) and metadata (JSON) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"members.{key}": value for key, value in self.members.state_dict().items()}
        tensors |= {"vector_mean": self.vector_mean, "vector_std": self.vector_std}
        save_file(
            {key: value.cpu().contiguous() for key, value in tensors.items()}, directory / "value.safetensors"
        )
        meta = {
            "config": self.config.model_dump(mode="json"),
            "tasks": self.tasks,
            "horizons": self.horizons,
            "training_uuids": sorted(str(episode_uuid) for episode_uuid in self.training_uuids),
            "training_loss": self.training_loss,
        }
        (directory / "value.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ValueModel:
        """Read a model written by ``save``; a missing directory or file is a clear ``FileNotFoundError``."""
        directory = Path(directory)
        for name in ("value.json", "value.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"value model: {directory / name} does not exist (save a ValueModel there)"
                )
        meta = json.loads((directory / "value.json").read_text())
        tensors = load_file(directory / "value.safetensors")
        model = cls(
            ValueConfig.model_validate(meta["config"]),
            meta["tasks"],
            meta["horizons"],
            tensors["vector_mean"].numpy(),
            tensors["vector_std"].numpy(),
            frozenset(uuid.UUID(text) for text in meta["training_uuids"]),
        )
        prefix = "members."
        model.members.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
        model.training_loss = meta["training_loss"]
        return model


def normalized_returns(
    episodes: Sequence[EpisodeRecord], config: ValueConfig, horizons: dict[str, int]
) -> np.ndarray:
    """Concatenated normalized Monte-Carlo returns of every step (the value targets)."""
    return np.concatenate(
        [monte_carlo_returns(step_rewards(ep, horizons[ep.task], config.reward)) for ep in episodes]
    ).astype(np.float32)


@dataclass
class Targets:
    """Model inputs of a set of steps and their binned return targets."""

    inputs: StepInputs
    targets: torch.Tensor


def validation_split(
    episodes: Sequence[EpisodeRecord], fraction: float, seed: int
) -> tuple[list[EpisodeRecord], list[EpisodeRecord]]:
    """Hold out ``fraction`` of each task's episodes (never a task's last training episode) for early stopping."""
    rng = np.random.default_rng(seed)
    held: set[uuid.UUID] = set()
    for task in sorted({episode.task for episode in episodes}):
        members = [episode.uuid for episode in episodes if episode.task == task]
        count = min(round(fraction * len(members)), len(members) - 1)
        held |= {members[i] for i in rng.permutation(len(members))[:count]}
    return [ep for ep in episodes if ep.uuid not in held], [ep for ep in episodes if ep.uuid in held]


#: ``fit(episodes, config, horizons) -> ValueModel``: how a value model gets trained (here or data-parallel).
ValueTrainer = Callable[[Sequence[EpisodeRecord], ValueConfig, dict[str, int] | None], "ValueModel"]


def train_value(
    episodes: Sequence[EpisodeRecord],
    config: ValueConfig,
    horizons: dict[str, int] | None = None,
    *,
    state_dir: Path | None = None,
) -> ValueModel:
    """Fit a distributional value model on ``episodes`` by cross-entropy to the binned Monte-Carlo returns.

    ``config.validation_fraction`` of each task's episodes is held out and the weights with the lowest held-out
    loss (checked every ``eval_every`` steps) are kept. ``horizons`` (task → max episode length) fixes the return
    normalization; by default it comes from ``config.reward`` and the data. Deterministic for ``config.seed``.

    Resumable (single process): with ``state_dir`` the training state (:mod:`policies.train_state` format:
    ensemble weights, the current member's optimizer, random state, best held-out weights) is written every
    ``eval_every`` steps to a file named by a fingerprint of the config, episodes and horizons, and a call with the
    same arguments continues from it (``ValueModel.resumed_from_step``) to the uninterrupted run's weights. The
    file is removed when training ends.
    """
    check_learnable(episodes)
    horizons = dict(horizons) if horizons is not None else task_horizons(episodes, config.reward)
    tasks = sorted({episode.task for episode in episodes})
    missing = [task for task in tasks if task not in horizons]
    if missing:
        raise RecapInputError(f"horizons: no max episode length for task {missing[0]!r}; pass one per task")
    vectors = np.concatenate([episode_vector(ep, config, horizons[ep.task]) for ep in episodes])
    std = vectors.std(axis=0)
    model = ValueModel(
        config,
        tasks,
        {task: horizons[task] for task in tasks},
        vectors.mean(axis=0),
        np.where(std > 1e-6, std, 1.0),
        frozenset(episode.uuid for episode in episodes),
    ).to(config.device)
    fit, held = validation_split(episodes, config.validation_fraction, config.seed)
    train = _targets(model, fit, horizons)
    validation = _targets(model, held, horizons) if held else None
    shard = _shard_steps(fit)
    resume = _ValueState.open(state_dir, config, episodes, horizons)
    if resume.state is not None:
        model.members.load_state_dict(resume.state["model"])
        model.resumed_from_step = int(resume.state["step"])
    for seed, member in enumerate(model.members):
        if seed < len(resume.losses):
            member.eval()  # finished before the interruption: its kept weights came with the state
        else:
            resume.losses.append(_fit_member(model, member, train, validation, seed, shard, resume))
    model.training_loss = float(np.mean(resume.losses))
    resume.finish()
    return model


class _ValueState:
    """The value model's resumable training state: where it is written and what a killed run left there."""

    def __init__(self, path: Path | None, state: dict | None) -> None:
        self.path, self.state = path, state
        self.losses: list[float] = list(state["losses"]) if state is not None else []

    @classmethod
    def open(
        cls,
        state_dir: Path | None,
        config: ValueConfig,
        episodes: Sequence[EpisodeRecord],
        horizons: dict[str, int],
    ) -> _ValueState:
        """The state of this training (config, episodes, horizons) under ``state_dir``, if any was written."""
        if state_dir is None or _distributed()[1] > 1:
            return cls(None, None)
        payload = {"config": config.model_dump(mode="json", exclude={"device"}), "horizons": horizons}
        payload["episodes"] = sorted(str(episode.uuid) for episode in episodes)
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(state_dir) / f"value-{digest}.pt"
        return cls(path, load_state(path))

    def member_state(self, member: int) -> dict | None:
        """What was saved mid-way through ensemble member ``member`` (None: it starts fresh)."""
        return self.state if self.state is not None and self.state["member"] == member else None

    def save(self, model: ValueModel, member: int, step: int, fields: dict) -> None:
        """Write the state after ``step`` of ``member`` (``fields``: optimizer, rng, best, last loss)."""
        if self.path is not None:
            position = {"member": member, "member_step": step, "losses": self.losses}
            position["step"] = member * model.config.train_steps + step
            save_state(self.path, {"model": model.members.state_dict(), **position, **fields})

    def finish(self) -> None:
        """Training ended: the state is no longer needed."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _targets(model: ValueModel, episodes: Sequence[EpisodeRecord], horizons: dict[str, int]) -> Targets:
    returns = torch.from_numpy(normalized_returns(episodes, model.config, horizons))
    return Targets(
        model.step_inputs(episodes), model.bins.encode(returns, model.config.target).to(model.device)
    )


def _loss(model: ValueModel, member: ValueNetwork, data: Targets, index: np.ndarray) -> torch.Tensor:
    log_probs = torch.log_softmax(model._logits(member, data.inputs, index), dim=-1)
    return -(data.targets[index] * log_probs).sum(-1).mean()


@torch.no_grad()
def _heldout_loss(model: ValueModel, member: ValueNetwork, data: Targets) -> float:
    member.eval()
    count = len(data.inputs.task_ids)
    total = 0.0
    for start in range(0, count, model.config.inference_batch_size):
        index = np.arange(start, min(count, start + model.config.inference_batch_size))
        total += _loss(model, member, data, index).item() * len(index)
    member.train()
    return total / count


def _shard_steps(episodes: Sequence[EpisodeRecord]) -> np.ndarray:
    """Indices of the training steps this worker draws minibatches from: the steps of its shard of episodes
    (``episodes[rank::world_size]`` under ``torch.distributed``, every step otherwise)."""
    rank, size = _distributed()
    owner = np.repeat(np.arange(len(episodes)) % size, [episode.length for episode in episodes])
    return np.flatnonzero(owner == rank)


def _distributed() -> tuple[int, int]:
    """This process's rank and the number of data-parallel workers ((0, 1) without torch.distributed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fit_member(
    model: ValueModel,
    member: ValueNetwork,
    train: Targets,
    validation: Targets | None,
    offset: int,
    shard: np.ndarray,
    resume: _ValueState,
) -> float:
    """Train one ensemble member; keep its best weights on ``validation``; return that (or the final) loss.

    Data parallel (one Ray Train worker per rank): each worker draws ``batch_size / N`` samples from ``shard``
    and DDP averages the gradients, so the global batch and learning rate are the single-process ones; every
    worker holds the same weights, so they agree on the held-out checkpoints.
    """
    config = model.config
    rank, size = _distributed()
    if config.batch_size % size:
        raise RecapInputError(
            f"batch_size: the global batch {config.batch_size} must divide among {size} workers"
        )
    rng = np.random.default_rng(config.seed + offset if rank == 0 else [config.seed + offset, rank])
    optimizer = torch.optim.AdamW(
        member.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    best = (float("inf"), copy.deepcopy(member.state_dict()))
    network = torch.nn.parallel.DistributedDataParallel(member) if size > 1 else member
    member.train()
    start, last = 0, float("nan")
    with torch.random.fork_rng():
        torch.manual_seed(config.seed + offset)
        saved = resume.member_state(offset)
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
            restore_rng(saved["rng"], rng, None)
            best, start, last = (
                (saved["best_loss"], saved["best_weights"]),
                saved["member_step"],
                saved["last"],
            )
        for step in range(start + 1, config.train_steps + 1):
            loss = _loss(
                model, network, train, shard[rng.integers(0, len(shard), size=config.batch_size // size)]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % config.eval_every == 0 or step == config.train_steps:
                last = loss.item()
                if validation is not None:
                    heldout = _heldout_loss(model, member, validation)
                    if heldout < best[0]:
                        best = (heldout, copy.deepcopy(member.state_dict()))
                fields = {"optimizer": optimizer.state_dict(), "rng": capture_rng(rng, None), "last": last}
                resume.save(model, offset, step, fields | {"best_loss": best[0], "best_weights": best[1]})
    if validation is not None:
        member.load_state_dict(best[1])
    member.eval()
    return best[0] if validation is not None else last
