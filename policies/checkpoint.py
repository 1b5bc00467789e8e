"""VLA checkpoints: one directory with safetensors weights, JSON config, normalization stats and tokenizers.

Files: ``model.safetensors``, ``config.json``, ``norm_stats.json``, ``tokenizer.json`` (prompt BPE), and with
Knowledge Insulation ``fast_tokenizer.json``; ``policy.json`` names the kind (``policies.manifest``); ``inference.json`` keeps how the policy is meant to be queried (its
condition text, e.g. RECAP's "Advantage: positive", and the CFG β), so a served checkpoint behaves as evaluated.
Loading validates every file and every tensor shape against the
config and raises :class:`CheckpointError` naming the file and field. The policy version is derived from the
weights' content (``vla-<size>-<sha256 prefix>``), so identical weights always carry the same version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from policies.fast import FASTError, FASTTokenizer
from policies.manifest import VLA_KIND, write_kind
from policies.normalization import NormalizationError, NormalizationStats
from policies.vla.config import ConfigError, VLAConfig
from policies.vla.model import VLAModel
from policies.vla.policy import VLAInputError, VLAPolicy, check_components

WEIGHTS, CONFIG, NORM_STATS, TOKENIZER, FAST_TOKENIZER, INFERENCE = (
    "model.safetensors",
    "config.json",
    "norm_stats.json",
    "tokenizer.json",
    "fast_tokenizer.json",
    "inference.json",
)


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, corrupt or inconsistent (one line naming file and field)."""


def save_checkpoint(policy: VLAPolicy, directory: str | Path) -> str:
    """Write ``policy`` to ``directory`` (created if needed); returns the content-derived version string."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in policy.model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps(policy.config.to_dict(), indent=1))
    policy.norm_stats.save(path / NORM_STATS)
    policy.prompt_tokenizer.save(str(path / TOKENIZER))
    if policy.fast_tokenizer is not None:
        policy.fast_tokenizer.save(path / FAST_TOKENIZER)
    inference = {"conditions": policy.conditions, "cfg_beta": policy.cfg_beta}
    (path / INFERENCE).write_text(json.dumps(inference, indent=1))
    write_kind(path, VLA_KIND)
    return weights_version(path, policy.config)


def load_checkpoint(
    directory: str | Path, device: str | torch.device | None = None, **policy_kwargs
) -> VLAPolicy:
    """Load and validate a checkpoint into a :class:`VLAPolicy` (``version`` is content-derived unless given).

    The weights are read onto the CPU and the model is moved to ``device`` (``cpu``/``cuda``/``mps``/``auto``;
    default: stays on the CPU), so a checkpoint written on any device loads on any other.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    config = _load_config(path)
    norm_stats = _load_part(path / NORM_STATS, NormalizationStats.load, NormalizationError)
    prompt_tokenizer = _load_part(path / TOKENIZER, lambda p: Tokenizer.from_file(str(p)), Exception)
    fast_tokenizer = None
    if config.knowledge_insulation:
        fast_tokenizer = _load_part(path / FAST_TOKENIZER, FASTTokenizer.load, FASTError)
    model = VLAModel(config)
    _load_weights(model, path / WEIGHTS)
    policy_kwargs.setdefault("version", weights_version(path, config))
    for name, value in _load_inference(path / INFERENCE).items():
        policy_kwargs.setdefault(name, value)
    try:
        check_components(config, prompt_tokenizer, norm_stats, fast_tokenizer)
    except VLAInputError as error:
        raise CheckpointError(f"{path}: {error}") from error
    policy = VLAPolicy(model, prompt_tokenizer, norm_stats, fast_tokenizer, **policy_kwargs)
    return policy.to(device) if device is not None else policy


def weights_version(directory: str | Path, config: VLAConfig) -> str:
    """``vla-<size>-<first 12 hex of sha256(model.safetensors)>``."""
    digest = hashlib.sha256((Path(directory) / WEIGHTS).read_bytes()).hexdigest()[:12]
    return f"vla-{config.size}-{digest}"


def checkpoint_config(directory: str | Path) -> VLAConfig:
    """The model config of the checkpoint at ``directory`` (cameras, image size, …) without reading weights."""
    return _load_config(Path(directory))


def _load_config(path: Path) -> VLAConfig:
    file = path / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{file}: missing config file")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    try:
        return VLAConfig.from_dict(data)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{file}: {error}") from error


def _load_inference(file: Path) -> dict[str, object]:
    """The saved inference settings (none for checkpoints written before they were saved)."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from error
    conditions, beta = data.get("conditions"), data.get("cfg_beta", 1.0)
    if conditions is not None and not isinstance(conditions, str):
        raise CheckpointError(f"{file}: conditions: expected a string or null, got {conditions!r}")
    if isinstance(beta, bool) or not isinstance(beta, int | float):
        raise CheckpointError(f"{file}: cfg_beta: expected a number, got {beta!r}")
    return {"conditions": conditions, "cfg_beta": float(beta)}


def _load_part(file: Path, loader, errors):
    if not file.is_file():
        raise CheckpointError(f"{file}: missing file")
    try:
        return loader(file)
    except errors as error:
        raise CheckpointError(f"{file}: {error}") from error


def _load_weights(model: VLAModel, file: Path) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing weights file")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{file}: corrupt safetensors file ({error})") from error
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{file}: tensor {missing[0]!r} missing ({len(missing)} missing in total)")
    if unexpected:
        raise CheckpointError(
            f"{file}: unexpected tensor {unexpected[0]!r} (not in the model built from config)"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{file}: tensor {name!r} shape: expected {tuple(expected[name].shape)}, got {tuple(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{file}: tensor {name!r} has NaN or inf values")
    model.load_state_dict(tensors)
