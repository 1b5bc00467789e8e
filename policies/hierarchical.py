"""A two-level policy (Hi-Robot / π0.5): a high-level model names the next subtask as text, and the built-in VLA
acts conditioned on the task prompt plus ``subtask: <name>``.

The high-level model is small on purpose: a conv encoder over one camera, the proprio state, a learned
embedding of the task prompt and learned embeddings of the last ``history`` subtasks (``<start>`` before the
episode's first), classifying into the subtask vocabulary seen in training. Its output is text, so a human (or a
bigger model) can replace it without touching the low level.

A hierarchical checkpoint is one directory: ``low_level/`` (a VLA checkpoint, see ``policies.checkpoint``),
``subtask_model.safetensors``, ``subtask_model.json`` (format, vocabulary, camera, sizes, history) and
``policy.json`` (its kind, ``policies.manifest``). Its
version, ``hier-<12 hex>``, is derived from both levels' weights. Format 1 (no ``format`` key) had no subtask
history and loads as ``history=0``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from policies.base import ActionChunk, ObservationBatch, Policy
from policies.checkpoint import WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from policies.manifest import HIERARCHICAL_KIND, write_kind
from policies.vla.policy import VLAPolicy

LOW_LEVEL_DIR, SUBTASK_WEIGHTS, SUBTASK_CONFIG = (
    "low_level",
    "subtask_model.safetensors",
    "subtask_model.json",
)
FORMAT = 2  # 1: no subtask history (no "format" key); 2: adds "history"
START = "<start>"  # the history entry before an episode's first subtask


class SubtaskInputError(ValueError):
    """Input the subtask model cannot use; the message names the field."""


@dataclass(frozen=True)
class SubtaskVocabulary:
    """The prompts and subtask names a high-level model knows, in index order."""

    prompts: tuple[str, ...]
    subtasks: tuple[str, ...]

    def prompt_ids(self, prompts: list[str]) -> torch.Tensor:
        """Indices of ``prompts``; an unknown prompt is an error naming it."""
        lookup = {prompt: index for index, prompt in enumerate(self.prompts)}
        unknown = [p for p in prompts if p not in lookup]
        if unknown:
            raise SubtaskInputError(
                f"prompt: {unknown[0]!r} was not in training; known: {list(self.prompts)}"
            )
        return torch.tensor([lookup[p] for p in prompts])

    def history_ids(self, history: Sequence[Sequence[str]], k: int) -> torch.Tensor:
        """B×k indices of each row's last ``k`` subtasks (oldest first, left-padded with ``START``).

        ``START`` has index ``len(subtasks)``; an unknown name is an error naming it.
        """
        lookup = {name: index for index, name in enumerate(self.subtasks)} | {START: len(self.subtasks)}
        rows = []
        for recent in history:
            padded = [START] * max(0, k - len(recent)) + list(recent)[max(0, len(recent) - k) :] if k else []
            unknown = [name for name in padded if name not in lookup]
            if unknown:
                raise SubtaskInputError(
                    f"history: {unknown[0]!r} is not a known subtask; known: {list(self.subtasks)}"
                )
            rows.append([lookup[name] for name in padded])
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), k)


def previous_subtasks(labels: Sequence[str | None], k: int) -> list[tuple[str, ...]]:
    """For every step of one episode, the ``k`` labels before it (oldest first; ``START`` before step 0 or for
    unlabelled steps)."""
    padded = [START] * k + [START if label is None else label for label in labels]
    return [tuple(padded[t : t + k]) for t in range(len(labels))]


class SubtaskModel(nn.Module):
    """Image + state + task prompt + last ``history`` subtasks → logits over the subtask vocabulary."""

    def __init__(
        self,
        vocabulary: SubtaskVocabulary,
        camera: str,
        image_size: int,
        state_dim: int,
        width: int = 64,
        history: int = 1,
    ):
        super().__init__()
        if history < 0:
            raise SubtaskInputError(f"history: expected >= 0 recent subtasks, got {history}")
        self.vocabulary, self.camera, self.image_size, self.state_dim, self.width = (
            vocabulary,
            camera,
            image_size,
            state_dim,
            width,
        )
        self.history = history
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, width), nn.ReLU(),
        )  # fmt: skip
        self.prompt_embedding = nn.Embedding(len(vocabulary.prompts), width)
        if history:  # absent at history=0, so a format-1 state dict loads unchanged
            self.subtask_embedding = nn.Embedding(len(vocabulary.subtasks) + 1, width)  # + START
        self.head = nn.Sequential(
            nn.Linear((2 + history) * width + state_dim, width),
            nn.ReLU(),
            nn.Linear(width, len(vocabulary.subtasks)),
        )

    def forward(
        self,
        images: torch.Tensor,
        state: torch.Tensor,
        prompt_ids: torch.Tensor,
        history_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``images`` B×H×W×3 uint8, ``state`` B×S float, ``prompt_ids`` B, ``history_ids`` B×k → logits B×L."""
        pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        parts = [self.encoder(pixels), self.prompt_embedding(prompt_ids), state]
        if self.history:
            if history_ids is None or history_ids.shape != (len(images), self.history):
                got = None if history_ids is None else tuple(history_ids.shape)
                raise SubtaskInputError(f"history: expected {len(images)}×{self.history} ids, got {got}")
            parts.append(self.subtask_embedding(history_ids).flatten(1))
        return self.head(torch.cat(parts, dim=1))

    def check(self, batch: ObservationBatch) -> None:
        """Raise ``SubtaskInputError`` naming the field if the batch does not fit the model."""
        if self.camera not in batch["images"]:
            raise SubtaskInputError(f"images: missing camera {self.camera!r}, got {sorted(batch['images'])}")
        shape = batch["images"][self.camera].shape[1:]
        if shape != (self.image_size, self.image_size, 3):
            raise SubtaskInputError(
                f"images[{self.camera!r}]: expected {self.image_size}×{self.image_size}×3, got {shape}"
            )
        if batch["state"].shape[1] != self.state_dim:
            raise SubtaskInputError(f"state: expected {self.state_dim} values, got {batch['state'].shape[1]}")

    @torch.no_grad()
    def predict(self, batch: ObservationBatch, history: Sequence[Sequence[str]] | None = None) -> list[str]:
        """The most likely next subtask of every observation, given each row's recent subtasks (oldest first;
        ``None`` or an empty row means the episode just started)."""
        self.check(batch)
        rows = len(batch["state"])
        history = [()] * rows if history is None else history
        if len(history) != rows:
            raise SubtaskInputError(f"history: expected {rows} rows, got {len(history)}")
        self.eval()
        logits = self(
            torch.from_numpy(np.ascontiguousarray(batch["images"][self.camera])),
            torch.from_numpy(np.asarray(batch["state"], dtype=np.float32)),
            self.vocabulary.prompt_ids(list(batch["prompt"])),
            self.vocabulary.history_ids(history, self.history),
        )
        return [self.vocabulary.subtasks[i] for i in logits.argmax(dim=1).tolist()]


def train_subtask_model(
    images: np.ndarray,
    state: np.ndarray,
    prompts: list[str],
    subtasks: list[str],
    *,
    camera: str,
    previous: Sequence[Sequence[str]] | None = None,
    history: int = 1,
    history_noise: float = 0.3,
    steps: int = 500,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[SubtaskModel, list[float]]:
    """Fit a ``SubtaskModel`` on per-step samples (N images, states, prompts, labels); returns it and its losses.

    ``previous`` holds each sample's preceding demo labels (oldest first, e.g. from ``previous_subtasks``); the
    model sees the last ``history`` of them, each replaced by a random id (a subtask or ``START``) with
    probability ``history_noise`` so it cannot just copy the previous label. ``history=0`` ignores ``previous``.
    """
    if not (len(images) == len(state) == len(prompts) == len(subtasks)) or len(images) == 0:
        raise SubtaskInputError(
            f"samples: expected equal, non-zero lengths, got images {len(images)}, state {len(state)}, "
            f"prompts {len(prompts)}, subtasks {len(subtasks)}"
        )
    if history and (previous is None or len(previous) != len(subtasks)):
        got = "none" if previous is None else len(previous)
        raise SubtaskInputError(
            f"previous: expected {len(subtasks)} rows of recent labels for history={history}, got {got}"
        )
    if not 0.0 <= history_noise <= 1.0:
        raise SubtaskInputError(f"history_noise: expected a probability in [0, 1], got {history_noise}")
    torch.manual_seed(seed)
    vocabulary = SubtaskVocabulary(tuple(sorted(set(prompts))), tuple(sorted(set(subtasks))))
    model = SubtaskModel(vocabulary, camera, images.shape[1], state.shape[1], history=history)
    labels = torch.tensor([vocabulary.subtasks.index(s) for s in subtasks])
    prompt_ids = vocabulary.prompt_ids(prompts)
    history_ids = vocabulary.history_ids(previous or [()] * len(labels), history)
    images_t, state_t = torch.from_numpy(images), torch.from_numpy(state.astype(np.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    rng, losses = np.random.default_rng(seed), []
    model.train()
    for _ in tqdm(range(steps), desc="train subtasks", disable=not progress):
        index = torch.from_numpy(rng.integers(0, len(labels), size=min(batch_size, len(labels))))
        recent = _noisy(history_ids[index], history_noise, len(vocabulary.subtasks) + 1, rng)
        logits = model(images_t[index], state_t[index], prompt_ids[index], recent)
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return model, losses


def _noisy(ids: torch.Tensor, probability: float, vocabulary: int, rng: np.random.Generator) -> torch.Tensor:
    """``ids`` with each entry replaced by a uniformly random id with ``probability``."""
    replace = torch.from_numpy(rng.random(tuple(ids.shape)) < probability)
    random = torch.from_numpy(rng.integers(0, vocabulary, size=tuple(ids.shape)))
    return torch.where(replace, random, ids)


class HierarchicalPolicy:
    """High level names the subtask, low level (a VLA taking ``conditions=``) acts on ``task + subtask``.

    ``last_subtasks`` holds the subtask of each row of the latest batch (rollouts record it with the chunk).
    The high level is fed the subtasks it named itself on earlier calls, matched to batch rows by position (so one
    episode per row across calls); ``reset()`` clears them, and so does a change of batch size.
    """

    def __init__(self, high_level: SubtaskModel, low_level: Policy, version: str | None = None) -> None:
        self.high_level = high_level
        self.low_level = low_level
        self.action_horizon = low_level.action_horizon
        self.action_dim = low_level.action_dim
        self.last_subtasks: list[str] = []
        self.history: list[deque[str]] = []
        self._version = version

    @property
    def version(self) -> str:
        """The saved checkpoint's ``hier-…`` version, else the low level's (subtasks are recorded per step)."""
        return self._version or self.low_level.version

    @version.setter
    def version(self, value: str) -> None:
        self._version = value

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        """Predict each row's subtask from its observation and recent subtasks, then its chunk conditioned on
        ``subtask: <name>``."""
        started = time.perf_counter()
        rows = len(batch["state"])
        if len(self.history) != rows:
            self.history = [deque(maxlen=self.high_level.history) for _ in range(rows)]
        self.last_subtasks = self.high_level.predict(batch, [tuple(recent) for recent in self.history])
        for recent, subtask in zip(self.history, self.last_subtasks, strict=True):
            recent.append(subtask)
        chunk = self.low_level.infer(batch, conditions=[f"subtask: {s}" for s in self.last_subtasks])
        chunk.timing["high_level_ms"] = (time.perf_counter() - started) * 1e3 - chunk.timing.get(
            "infer_ms", 0.0
        )
        return chunk

    def reset(self) -> None:
        """Forget the subtask history (the next call starts from ``<start>``) and reset the low level."""
        self.history = []
        self.low_level.reset()


def is_hierarchical_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a hierarchical checkpoint (rather than a plain VLA one)."""
    return (Path(directory) / SUBTASK_CONFIG).is_file()


def save_hierarchical(policy: HierarchicalPolicy, directory: str | Path) -> str:
    """Write both levels to ``directory``; returns (and sets on ``policy``) the content-derived version."""
    if not isinstance(policy.low_level, VLAPolicy):
        raise TypeError(f"low_level: only a built-in VLA can be saved, got {type(policy.low_level).__name__}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(policy.low_level, path / LOW_LEVEL_DIR)
    high = policy.high_level
    save_file({k: v.detach().contiguous() for k, v in high.state_dict().items()}, str(path / SUBTASK_WEIGHTS))
    config = {
        "format": FORMAT,
        "prompts": list(high.vocabulary.prompts),
        "subtasks": list(high.vocabulary.subtasks),
        "camera": high.camera,
        "image_size": high.image_size,
        "state_dim": high.state_dim,
        "width": high.width,
        "history": high.history,
    }
    (path / SUBTASK_CONFIG).write_text(json.dumps(config, indent=1))
    write_kind(path, HIERARCHICAL_KIND)
    policy.version = _hierarchical_version(path)
    return policy.version


def load_hierarchical(directory: str | Path) -> HierarchicalPolicy:
    """Load a checkpoint written by ``save_hierarchical``; a missing or bad file raises ``CheckpointError``."""
    path = Path(directory)
    if not is_hierarchical_checkpoint(path):
        raise CheckpointError(f"{path / SUBTASK_CONFIG}: missing subtask model config")
    try:
        config = json.loads((path / SUBTASK_CONFIG).read_text())
        version = config.get("format", 1)
        if version not in (1, FORMAT):
            raise CheckpointError(f"{path / SUBTASK_CONFIG}: format {version} is not supported (1..{FORMAT})")
        vocabulary = SubtaskVocabulary(tuple(config["prompts"]), tuple(config["subtasks"]))
        high = SubtaskModel(
            vocabulary,
            config["camera"],
            config["image_size"],
            config["state_dim"],
            config["width"],
            history=config["history"] if version >= 2 else 0,
        )
        high.load_state_dict(load_file(str(path / SUBTASK_WEIGHTS)))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{path}: bad subtask model ({type(error).__name__}: {error})") from error
    high.eval()
    return HierarchicalPolicy(high, load_checkpoint(path / LOW_LEVEL_DIR), _hierarchical_version(path))


def _hierarchical_version(path: Path) -> str:
    digest = hashlib.sha256()
    for file in (path / LOW_LEVEL_DIR / WEIGHTS, path / SUBTASK_WEIGHTS, path / SUBTASK_CONFIG):
        digest.update(file.read_bytes())
    return f"hier-{digest.hexdigest()[:12]}"
