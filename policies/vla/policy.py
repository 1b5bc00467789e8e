"""``VLAPolicy``: the built-in VLA behind flywheel's ``Policy`` contract (processor + model + sampling).

It owns the model, the prompt tokenizer, the normalization statistics and (with Knowledge Insulation) the FAST
tokenizer; it validates and converts an ``ObservationBatch`` into tensors, samples a chunk and unnormalizes it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from policies.base import ActionChunk, ObservationBatch
from policies.device import resolve_device
from policies.fast import FASTTokenizer
from policies.normalization import NormalizationStats
from policies.vla.config import VLAConfig
from policies.vla.model import GuidanceFn, PrefixOutput, VLAModel
from policies.vla.prompt_tokenizer import PAD_ID, encode_prompts


class VLAInputError(ValueError):
    """Observations or training data the VLA cannot accept (one line naming the field and the expected value)."""


@dataclass
class ModelInputs:
    """Tensors the model reads: images ``B×C×3×S×S`` in [−1, 1], token ids/validity ``B×L``, state ``B×S``."""

    images: torch.Tensor
    tokens: torch.Tensor
    token_valid: torch.Tensor
    state: torch.Tensor


def join_prompt(prompt: str, condition: str | None) -> str:
    """The prompt the model reads: task prompt, then the condition text (if any) after a space."""
    return f"{prompt} {condition}" if condition else prompt


class VLAPolicy:
    """The built-in π0-style VLA as a ``Policy``.

    ``conditions`` (one string for all, or one per observation) is appended to every prompt unless ``infer`` is
    given its own; ``cfg_beta`` ≠ 1 turns on classifier-free guidance against the prompt without conditions.
    Noise comes from a generator seeded with ``seed`` (``reset`` does not reseed; pass ``noise`` to ``infer`` for
    exact reproducibility).
    """

    def __init__(
        self,
        model: VLAModel,
        prompt_tokenizer: Tokenizer,
        norm_stats: NormalizationStats,
        fast_tokenizer: FASTTokenizer | None = None,
        version: str = "vla-untrained",
        conditions: str | None = None,
        cfg_beta: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.config: VLAConfig = model.config
        self.model = model
        self.prompt_tokenizer = prompt_tokenizer
        self.norm_stats = norm_stats
        self.fast_tokenizer = fast_tokenizer
        self.version = version
        self.action_horizon = self.config.action_horizon
        self.action_dim = self.config.action_dim
        self.conditions = conditions
        self.cfg_beta = cfg_beta
        self.generator = torch.Generator().manual_seed(seed)
        check_components(self.config, prompt_tokenizer, norm_stats, fast_tokenizer)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live (inputs are moved there; outputs come back to the CPU)."""
        return next(self.model.parameters()).device

    def __getstate__(self) -> dict[str, object]:
        """Pickled (Ray object store, actors) with the weights on the CPU: a receiver without the accelerator
        can load it, and places it on its own device (``to``)."""
        state = self.__dict__.copy()
        if self.device.type != "cpu":
            state["model"] = copy.deepcopy(self.model).cpu()
        return state

    def to(self, device: str | torch.device) -> VLAPolicy:
        """Move the model to ``device`` (``cpu``, ``cuda``, ``mps`` or ``auto``, see :mod:`policies.device`)."""
        self.model.to(resolve_device(device))
        return self

    # ----- Policy contract -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """No per-episode state: every chunk is computed from its own observation."""

    @torch.no_grad()
    def infer(
        self,
        batch: ObservationBatch,
        *,
        conditions: str | list[str | None] | None = None,
        cfg_beta: float | None = None,
        noise: np.ndarray | None = None,
        num_steps: int | None = None,
        guidance: GuidanceFn | None = None,
    ) -> ActionChunk:
        """Sample a ``B×H×D`` chunk (raw action units) plus the final prefix embeddings and timing in ms."""
        start = time.perf_counter()
        self.model.eval()
        conditions = self.conditions if conditions is None else conditions
        beta = self.cfg_beta if cfg_beta is None else cfg_beta
        inputs = self.prepare(batch, conditions)
        prefix = self.model.encode_prefix(inputs.images, inputs.tokens, inputs.token_valid)
        prefix_ms = (time.perf_counter() - start) * 1e3
        unconditional = None
        if beta != 1.0:
            plain = self.prepare(batch, None)
            unconditional = self.model.encode_prefix(plain.images, plain.tokens, plain.token_valid)
        x0 = self._noise(len(batch["prompt"]), noise)
        steps = num_steps or self.config.num_steps
        if guidance is not None:
            with torch.enable_grad():
                normalized = self.model.sample_actions(
                    prefix, inputs.state, x0, steps, unconditional, beta, guidance
                )
        else:
            normalized = self.model.sample_actions(prefix, inputs.state, x0, steps, unconditional, beta)
        actions = self.norm_stats.actions.unnormalize(
            normalized.detach().float().cpu().numpy(), self.config.normalization
        )
        embeddings = prefix.embeddings.float().cpu().numpy().astype(np.float32)
        timing = {"prefix_ms": prefix_ms, "infer_ms": (time.perf_counter() - start) * 1e3}
        return ActionChunk(actions.astype(np.float32), embeddings, timing)

    # ----- hooks ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefix_embeddings(
        self, batch: ObservationBatch, conditions: str | list[str | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Final backbone embeddings of the prefix (``B×P×E``) and their validity mask (``B×P``), for RLT."""
        self.model.eval()
        prefix = self.encode(batch, conditions)
        return prefix.embeddings.float().cpu().numpy(), prefix.valid.cpu().numpy()

    def encode(
        self, batch: ObservationBatch, conditions: str | list[str | None] | None = None
    ) -> PrefixOutput:
        """Torch-level prefix encoding (keeps the graph when called with gradients enabled)."""
        inputs = self.prepare(batch, conditions)
        return self.model.encode_prefix(inputs.images, inputs.tokens, inputs.token_valid)

    # ----- processing ----------------------------------------------------------------------------------------
    def prepare(
        self, batch: ObservationBatch, conditions: str | list[str | None] | None = None
    ) -> ModelInputs:
        """Validate and convert a batch: cameras, image size/dtype, state size, prompt length."""
        prompts = _prompts(batch)
        size = len(prompts)
        per_item = _per_item_conditions(conditions, size)
        images = self.prepare_images(batch.get("images"), size)
        tokens, valid = self.tokenize([join_prompt(p, c) for p, c in zip(prompts, per_item, strict=True)])
        state = self.prepare_state(batch.get("state"), size)
        device = self.device
        return ModelInputs(images.to(device), tokens.to(device), valid.to(device), state.to(device))

    def prepare_images(self, images: dict[str, np.ndarray] | None, size: int) -> torch.Tensor:
        """``B×C×3×S×S`` float tensor in [−1, 1] from uint8 ``B×S×S×3`` arrays, cameras in config order
        (``C`` = 0 for a state-input model, which ignores any images it is given)."""
        side = self.config.image_size
        if not self.config.cameras:
            return torch.zeros(size, 0, 3, side, side)
        if not isinstance(images, dict):
            raise VLAInputError(
                f"images: expected a dict camera -> B×H×W×3 uint8 array, got {type(images).__name__}"
            )
        stacked = []
        for camera in self.config.cameras:
            if camera not in images:
                raise VLAInputError(
                    f"images[{camera!r}]: missing camera, expected cameras {list(self.config.cameras)}"
                )
            array = np.asarray(images[camera])
            if array.dtype != np.uint8:
                raise VLAInputError(f"images[{camera!r}].dtype: expected uint8, got {array.dtype}")
            if array.shape != (size, side, side, 3):
                raise VLAInputError(
                    f"images[{camera!r}].shape: expected ({size}, {side}, {side}, 3), got {array.shape}"
                )
            stacked.append(array)
        pixels = torch.from_numpy(np.stack(stacked, axis=1)).permute(0, 1, 4, 2, 3)
        return pixels.float() / 127.5 - 1.0

    def prepare_state(self, state: np.ndarray | None, size: int) -> torch.Tensor:
        """Normalized ``B×S`` float tensor."""
        array = np.asarray(state, dtype=np.float32) if state is not None else None
        if array is None or array.shape != (size, self.config.state_dim):
            shape = None if array is None else array.shape
            raise VLAInputError(f"state.shape: expected ({size}, {self.config.state_dim}), got {shape}")
        if not np.isfinite(array).all():
            raise VLAInputError("state: expected finite values, got NaN or inf")
        return torch.from_numpy(self.norm_stats.state.normalize(array, self.config.normalization))

    def tokenize(self, prompts: list[str], trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``B×max_prompt_tokens`` ids and validity; overlong prompts raise naming the prompt.

        ``trim`` pads only to the longest prompt of the batch (training speed); padding is masked out of attention,
        so the valid tokens' outputs do not depend on it.
        """
        try:
            ids, longest = encode_prompts(self.prompt_tokenizer, prompts, self.config.max_prompt_tokens)
        except ValueError as error:
            raise VLAInputError(str(error)) from error
        length = max(longest, 1) if trim else self.config.max_prompt_tokens
        tokens = torch.full((len(ids), length), PAD_ID, dtype=torch.long)
        for row, row_ids in enumerate(ids):
            tokens[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        return tokens, tokens != PAD_ID

    def normalize_actions(self, actions: np.ndarray) -> torch.Tensor:
        """Raw ``…×D`` actions → normalized tensor; the last dimension must be ``action_dim``."""
        array = np.asarray(actions, dtype=np.float32)
        if array.shape[-1] != self.config.action_dim:
            raise VLAInputError(
                f"actions.shape[-1]: expected action_dim={self.config.action_dim}, got {array.shape}"
            )
        return torch.from_numpy(self.norm_stats.actions.normalize(array, self.config.normalization))

    def _noise(self, size: int, noise: np.ndarray | None) -> torch.Tensor:
        shape = (size, self.config.action_horizon, self.config.action_dim)
        if noise is None:
            return torch.randn(shape, generator=self.generator).to(self.device)
        if tuple(np.shape(noise)) != shape:
            raise VLAInputError(f"noise.shape: expected {shape}, got {np.shape(noise)}")
        return torch.as_tensor(np.asarray(noise, dtype=np.float32), device=self.device)


def check_components(
    config: VLAConfig,
    prompt_tokenizer: Tokenizer,
    norm_stats: NormalizationStats,
    fast_tokenizer: FASTTokenizer | None,
) -> None:
    """Raise :class:`VLAInputError` naming the field if tokenizers or statistics do not fit the config."""
    checks = [
        ("prompt_tokenizer.vocab_size", prompt_tokenizer.get_vocab_size(), config.vocab_size),
        ("norm_stats.state.dim", norm_stats.state.dim, config.state_dim),
        ("norm_stats.actions.dim", norm_stats.actions.dim, config.action_dim),
        ("norm_stats.mode", norm_stats.mode, config.normalization),
    ]
    if config.knowledge_insulation:
        if fast_tokenizer is None:
            raise VLAInputError(
                "fast_tokenizer: expected a FASTTokenizer when knowledge_insulation is on, got None"
            )
        checks += [
            ("fast_tokenizer.vocab_size", fast_tokenizer.vocab_size, config.fast_vocab_size),
            ("fast_tokenizer.horizon", fast_tokenizer.horizon, config.action_horizon),
            ("fast_tokenizer.action_dim", fast_tokenizer.action_dim, config.action_dim),
        ]
    for name, actual, expected in checks:
        if actual != expected:
            raise VLAInputError(f"{name}: expected {expected!r} (from the config), got {actual!r}")


def _prompts(batch: ObservationBatch) -> list[str]:
    prompts = batch.get("prompt")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise VLAInputError(
            f"prompt: expected a non-empty list of str (one per observation), got {prompts!r:.80}"
        )
    return prompts


def _per_item_conditions(conditions: str | list[str | None] | None, size: int) -> list[str | None]:
    if conditions is None or isinstance(conditions, str):
        return [conditions] * size
    if len(conditions) != size:
        raise VLAInputError(f"conditions: expected one per observation ({size}), got {len(conditions)}")
    return list(conditions)
