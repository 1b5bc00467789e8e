"""Where the learners run: one home for picking a torch device and for mixed precision.

``resolve_device("auto")`` picks CUDA, then Apple's MPS, then the CPU; ``"cuda"``/``"mps"`` fail with one line
naming what is missing when the accelerator is absent. :func:`autocast` runs a block in bfloat16 where the device
supports it (CUDA with bf16 support, the CPU, MPS) and is a no-op otherwise or when not asked. :func:`load_map`
is the ``map_location`` every checkpoint loader passes, so a file written on any device loads on any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

#: What ``--device`` accepts.
DeviceName = Literal["cpu", "cuda", "mps", "auto"]
DEVICE_NAMES: tuple[str, ...] = ("cpu", "cuda", "mps", "auto")


class DeviceError(ValueError):
    """A device that does not exist on this machine or a name that is not a device (one line)."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for ``name``: ``cpu``, ``cuda`` (or ``cuda:N``), ``mps`` or ``auto`` (the accelerator
    when one is present, else the CPU)."""
    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = text.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device: expected one of {', '.join(DEVICE_NAMES)}, got {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device: 'cuda' asked for, but no CUDA GPU is visible to torch (use cpu or auto)")
    if kind == "mps" and not _mps_available():
        raise DeviceError("device: 'mps' asked for, but the MPS backend is not available (use cpu or auto)")
    try:
        return torch.device(text)
    except RuntimeError as error:
        raise DeviceError(f"device: {name!r} is not a torch device ({error})") from error


def bf16_supported(device: torch.device) -> bool:
    """Whether autocast to bfloat16 runs on ``device`` (CPU and MPS always; CUDA where the GPU has bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("cpu", "mps")


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[bool]:
    """Run the block under bfloat16 autocast when ``enabled`` and the device supports it; yields whether it did.

    Parameters and optimizer state stay float32 (autocast only lowers the matmuls/convolutions), so no loss
    scaling is needed for bfloat16.
    """
    active = enabled and bf16_supported(device)
    if not active:
        yield False
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield True


def load_map(device: torch.device | str | None = None) -> torch.device:
    """``map_location`` for loading a checkpoint onto ``device`` (default: the CPU, then moved by the caller)."""
    return torch.device("cpu") if device is None else resolve_device(device)


def describe(device: torch.device) -> dict[str, str]:
    """What to record in a run's parameters / checkpoint metadata: the device chosen and its hardware name."""
    name = "cpu"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "apple-mps"
    return {"device": str(device), "device_name": name}


def place(policy: Any, device: str | torch.device) -> Any:
    """``policy`` with its torch weights on ``device`` (policies with a ``to`` method, e.g. the VLA); policies
    without weights here (scripted, remote) are returned as they are."""
    mover = getattr(policy, "to", None)
    return mover(device) if callable(mover) else policy
