"""Observations on the wire: what a served policy expects, how fields are named, and strict validation.

flywheel's own wire format is its :class:`~policies.base.Observation` dict
(``{"images": {camera: H×W×3 uint8}, "state": float32 (S,), "prompt": str}``). openpi servers name fields flat
instead (``"observation/image"``, ``"observation/state"``, ``"prompt"``); :class:`ObservationKeys` maps
between the two so the same code talks to both. Validation turns every malformed field into an
:class:`ObservationError` naming the field and the expected value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.base import Observation, Policy

PRIVILEGED = "privileged"


class ObservationError(ValueError):
    """An observation field is missing or has the wrong type, dtype or shape; the message names the field."""


@dataclass(frozen=True)
class ObservationSpec:
    """What a served policy expects: camera names with image ``(H, W)``, the state length, and the length of
    the simulator state ``privileged`` for policies that read it (scripted experts).

    An empty ``cameras`` mapping accepts any camera names and sizes (the batcher only groups equal shapes);
    ``state_dim=None`` accepts any state length, ``privileged_dim=None`` any ``privileged`` length.
    """

    cameras: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    state_dim: int | None = None
    privileged_dim: int | None = None

    @classmethod
    def of(cls, policy: Policy) -> ObservationSpec:
        """Read the spec a policy advertises.

        Either an ``observation_spec`` attribute, or ``cameras`` + ``image_size`` (int or ``(H, W)``) +
        ``state_dim`` + ``privileged_dim`` on the policy or on its ``config`` (as the built-in VLA has them);
        whatever is absent is accepted as anything.
        """
        declared = getattr(policy, "observation_spec", None)
        if isinstance(declared, ObservationSpec):
            return declared
        sources = (policy, getattr(policy, "config", None))
        cameras: Sequence[str] = _first_attribute(sources, "cameras") or ()
        size = _first_attribute(sources, "image_size")
        state_dim = _first_attribute(sources, "state_dim")
        privileged_dim = _first_attribute(sources, "privileged_dim")
        if isinstance(size, int):
            size = (size, size)
        if not cameras or size is None:
            return cls(state_dim=state_dim, privileged_dim=privileged_dim)
        return cls(
            cameras={camera: (int(size[0]), int(size[1])) for camera in cameras},
            state_dim=state_dim,
            privileged_dim=privileged_dim,
        )

    def to_metadata(self) -> dict[str, Any]:
        """The spec as plain msgpack-able values (``cameras``: name → ``[H, W, 3]``; ``privileged_dim`` only
        when declared)."""
        metadata: dict[str, Any] = {
            "cameras": {name: [h, w, 3] for name, (h, w) in self.cameras.items()},
            "state_dim": self.state_dim,
        }
        if self.privileged_dim is not None:
            metadata["privileged_dim"] = self.privileged_dim
        return metadata

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ObservationSpec:
        """Inverse of :meth:`to_metadata` (missing fields mean "anything")."""
        cameras = metadata.get("cameras") or {}
        return cls(
            cameras={str(name): (int(shape[0]), int(shape[1])) for name, shape in cameras.items()},
            state_dim=metadata.get("state_dim"),
            privileged_dim=metadata.get("privileged_dim"),
        )


@dataclass(frozen=True)
class ObservationKeys:
    """Flat wire names for observation fields, as openpi servers use them.

    ``images`` maps a flywheel camera name to its wire key. ``state`` is one wire key, or a sequence of
    ``(wire key, length)`` pairs that split the state vector in order (openpi's DROID policies take
    ``observation/joint_position`` and ``observation/gripper_position`` separately).
    """

    images: Mapping[str, str]
    state: str | Sequence[tuple[str, int]] = "observation/state"
    prompt: str = "prompt"

    @classmethod
    def parse(cls, entries: Sequence[str]) -> ObservationKeys:
        """Build from ``image:<camera>=<wire key>``, ``state=<wire key>`` (or ``state=<key>:<n>,<key>:<n>``
        to split the vector) and ``prompt=<wire key>`` entries, e.g. from a command line."""
        images: dict[str, str] = {}
        state: str | tuple[tuple[str, int], ...] = "observation/state"
        prompt = "prompt"
        for entry in entries:
            name, sep, wire = entry.partition("=")
            if not sep or not wire:
                raise ValueError(f"key map entry {entry!r}: expected NAME=WIRE_KEY")
            if name.startswith("image:") and name[6:]:
                images[name[6:]] = wire
            elif name == "state":
                state = _parse_state_split(wire) if "," in wire or ":" in wire else wire
            elif name == "prompt":
                prompt = wire
            else:
                raise ValueError(f"key map entry {entry!r}: NAME must be image:<camera>, state or prompt")
        if not images:
            raise ValueError("key map: at least one image:<camera>=<wire key> entry is needed")
        return cls(images=images, state=state, prompt=prompt)

    @classmethod
    def libero(cls, main_camera: str = "main", wrist_camera: str = "wrist") -> ObservationKeys:
        """openpi's LIBERO policies (π0/π0.5): ``observation/image``, ``observation/wrist_image``."""
        return cls(images={main_camera: "observation/image", wrist_camera: "observation/wrist_image"})

    @classmethod
    def droid(cls, exterior_camera: str = "exterior", wrist_camera: str = "wrist") -> ObservationKeys:
        """openpi's DROID policies: 7 joint positions + 1 gripper position, two cameras."""
        return cls(
            images={
                exterior_camera: "observation/exterior_image_1_left",
                wrist_camera: "observation/wrist_image_left",
            },
            state=(("observation/joint_position", 7), ("observation/gripper_position", 1)),
        )


def _parse_state_split(text: str) -> tuple[tuple[str, int], ...]:
    parts = []
    for item in text.split(","):
        key, _, length = item.rpartition(":")
        if not key or not length.isdigit() or int(length) < 1:
            raise ValueError(f"key map state part {item!r}: expected <wire key>:<length>")
        parts.append((key, int(length)))
    return tuple(parts)


def _first_attribute(sources: Sequence[object], name: str) -> Any:
    for source in sources:
        value = getattr(source, name, None)
        if value is not None:
            return value
    return None


def observation_to_wire(
    observation: Observation, keys: ObservationKeys | None = None, send_privileged: bool = False
) -> dict[str, Any]:
    """The message a client sends for one observation.

    ``privileged`` (the simulator's full state) stays on the robot unless ``send_privileged`` is set, which
    only makes sense for a simulated robot and a server started with ``allow_privileged`` (scripted experts).
    """
    state = np.asarray(observation["state"], dtype=np.float32)
    if keys is None:
        message = {"images": dict(observation["images"]), "state": state, "prompt": observation["prompt"]}
    else:
        message = {keys.prompt: observation["prompt"]}
        for camera, key in keys.images.items():
            if camera not in observation["images"]:
                raise ObservationError(f"images[{camera!r}]: missing, the key map sends it as {key!r}")
            message[key] = observation["images"][camera]
        if isinstance(keys.state, str):
            message[keys.state] = state
        else:
            _split_state(state, keys.state, message)
    if send_privileged:
        if "privileged" not in observation:
            raise ObservationError("privileged: missing, but send_privileged is set")
        message[PRIVILEGED] = np.asarray(observation["privileged"], dtype=np.float32)
    return message


def _split_state(state: np.ndarray, parts: Sequence[tuple[str, int]], message: dict[str, Any]) -> None:
    total = sum(length for _, length in parts)
    if state.shape != (total,):
        raise ObservationError(f"state: shape {state.shape}, the key map splits a ({total},) vector")
    start = 0
    for key, length in parts:
        message[key] = state[start : start + length]
        start += length


def observation_from_wire(
    message: Any,
    spec: ObservationSpec,
    keys: ObservationKeys | None = None,
    default_prompt: str | None = None,
    allow_privileged: bool = False,
) -> Observation:
    """Validate a decoded message against ``spec`` and return a flywheel :class:`Observation`.

    Unknown fields are ignored (openpi clients may send extras); ``privileged`` is refused unless
    ``allow_privileged`` (a simulation-only setting for serving scripted experts).
    """
    if not isinstance(message, dict):
        raise ObservationError(f"observation: expected a map, got {type(message).__name__}")
    if keys is None:
        images, state, prompt = message.get("images"), message.get("state"), message.get("prompt")
        state_field, prompt_field = "state", "prompt"
    else:
        images = {camera: message.get(key) for camera, key in keys.images.items()}
        state, prompt = _join_state(message, keys.state), message.get(keys.prompt)
        state_field = keys.state if isinstance(keys.state, str) else "state"
        prompt_field = keys.prompt
    observation = Observation(
        images=_check_images(images, spec, keys),
        state=_check_state(state, spec.state_dim, state_field),
        prompt=_check_prompt(prompt, default_prompt, prompt_field),
    )
    if PRIVILEGED in message:
        if not allow_privileged:
            raise ObservationError("privileged: refused, this server does not take simulator state")
        observation["privileged"] = _check_state(message[PRIVILEGED], spec.privileged_dim, PRIVILEGED)
    return observation


def _join_state(message: dict, state_keys: str | Sequence[tuple[str, int]]) -> Any:
    if isinstance(state_keys, str):
        return message.get(state_keys)
    parts = []
    for key, length in state_keys:
        part = message.get(key)
        if not isinstance(part, np.ndarray) or part.shape != (length,):
            shape = getattr(part, "shape", type(part).__name__)
            raise ObservationError(f"{key}: expected a float array of shape ({length},), got {shape}")
        parts.append(part)
    return np.concatenate(parts)


def _check_images(images: Any, spec: ObservationSpec, keys: ObservationKeys | None) -> dict[str, np.ndarray]:
    def name(camera: str) -> str:
        return keys.images[camera] if keys is not None else f"images[{camera!r}]"

    if not isinstance(images, dict):
        got = type(images).__name__
        raise ObservationError(f"images: expected a map camera → H×W×3 uint8 array, got {got}")
    if not all(isinstance(camera, str) for camera in images):
        raise ObservationError(f"images: camera names must be str, got {list(images)!r:.100}")
    if spec.cameras and sorted(images) != sorted(spec.cameras):
        raise ObservationError(f"images: cameras {sorted(images)}, expected {sorted(spec.cameras)}")
    checked = {}
    for camera, image in images.items():
        is_image = isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
        if not is_image or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ObservationError(f"{name(camera)}: expected an H×W×3 uint8 array, got {got}")
        if spec.cameras and image.shape[:2] != tuple(spec.cameras[camera]):
            h, w = spec.cameras[camera]
            raise ObservationError(f"{name(camera)}: shape {image.shape}, expected ({h}, {w}, 3)")
        checked[camera] = image
    return checked


def _check_state(state: Any, expected_dim: int | None, field_name: str) -> np.ndarray:
    if not isinstance(state, np.ndarray) or state.ndim != 1 or state.dtype.kind not in "fiu":
        got = f"{state.dtype} {state.shape}" if isinstance(state, np.ndarray) else type(state).__name__
        raise ObservationError(f"{field_name}: expected a 1-D float array, got {got}")
    if expected_dim is not None and state.shape != (expected_dim,):
        raise ObservationError(f"{field_name}: shape {state.shape}, expected ({expected_dim},)")
    state = state.astype(np.float32)
    if not np.isfinite(state).all():
        raise ObservationError(f"{field_name}: contains NaN or infinite values")
    return state


def _check_prompt(prompt: Any, default_prompt: str | None, field_name: str) -> str:
    if prompt is None and default_prompt is not None:
        return default_prompt
    if not isinstance(prompt, str):
        raise ObservationError(f"{field_name}: expected a str, got {type(prompt).__name__}")
    return prompt
