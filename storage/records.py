"""The columnar episode format: what actors build and the store writes in one transaction.

Everything a step carries is an array with the episode length T as its first axis, so an episode moves as a
handful of contiguous buffers rather than T objects. ``validate`` checks shapes, dtypes and finiteness before
anything touches the database; the store calls it, so bad input never reaches SQL.

``validate`` also refuses whatever either database backend would refuse, with the column limits of
``storage.limits`` (which ``storage.schema`` declares its columns with), so SQLite, which enforces none of them,
and PostgreSQL behave the same: strings longer than their column, NUL bytes and lone surrogates in any string
(PostgreSQL's text and JSON refuse them), integers outside their column's range (``seed`` is a signed 64-bit
``BIGINT``), and JSON nested deeper than ``MAX_JSON_DEPTH`` or holding non-finite floats. Those refusals are ``StoreLimitError``. The robot's spool
validates before it encodes, so an episode a robot spools is one the platform can store. ``TaskSpec`` adds
what one task's episodes must look like (state/action sizes, cameras); the ingest endpoint checks it.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.types import InterventionSegment, Observation, Outcome, StepSource
from storage import limits
from storage.limits import ColumnLimit

MAX_JSON_DEPTH = 64
"""Deepest nesting of JSON values (metadata, relabel config/diagnostics): checked without recursion."""

_MAX_JSON_INT_BITS = 4096
"""Largest JSON integer (bits): far below what PostgreSQL's numeric and Python's int-to-text conversion take."""


class EpisodeValidationError(ValueError):
    """An episode record is malformed; the message names the field and what was expected."""

    def __init__(self, field_name: str, expected: str, got: str) -> None:
        super().__init__(f"{field_name}: expected {expected}, got {got}")
        self.field_name = field_name
        self.expected = expected
        self.got = got


class StoreLimitError(EpisodeValidationError):
    """A value the store cannot hold on some backend: a string longer than its column, a NUL byte, an integer
    outside its column's range, JSON nested too deep or not finite. The message names the field and the limit."""


def parse_outcome(value: Outcome | str) -> Outcome:
    """``value`` as an ``Outcome``; ``EpisodeValidationError`` naming the choices if it is none of them."""
    try:
        return Outcome(value)
    except ValueError:
        choices = "/".join(o.value for o in Outcome)
        raise EpisodeValidationError("outcome", f"one of {choices}", repr(value)) from None


@dataclass(frozen=True)
class EpisodeQuery:
    """Which episodes a read covers: every field that is not None must match (all None: every episode).

    ``tasks``, ``outcomes``, ``policy_versions`` and ``run_ids`` are tuples of accepted values (the store compiles
    each to an ``IN`` clause; a list is kept as a tuple, so equal queries compare and hash equal). Outcomes may be
    given as strings; they are stored as ``Outcome`` (a bad value raises ``EpisodeValidationError``).
    ``max_per_task`` keeps the oldest that many matching episodes of each task. ``EpisodeQuery.of`` builds the
    one-value-per-filter query of the store's keyword methods (``list_episodes(task=…, run_id=…)``).
    """

    tasks: tuple[str, ...] | None = None
    outcomes: tuple[Outcome, ...] | None = None
    policy_versions: tuple[str, ...] | None = None
    run_ids: tuple[str, ...] | None = None
    max_per_task: int | None = None

    def __post_init__(self) -> None:
        for name in _QUERY_FIELDS:
            values = getattr(self, name)
            if isinstance(values, str | Outcome):
                raise EpisodeValidationError(name, "a tuple or list of values", repr(values))
            if values is not None:
                parse = parse_outcome if name == "outcomes" else str
                object.__setattr__(self, name, tuple(parse(value) for value in values))
        if self.max_per_task is not None and self.max_per_task < 1:
            raise EpisodeValidationError("max_per_task", "at least 1", repr(self.max_per_task))

    @classmethod
    def of(
        cls,
        task: str | None = None,
        outcome: Outcome | str | None = None,
        policy_version: str | None = None,
        run_id: str | None = None,
    ) -> EpisodeQuery:
        """The query matching one value per given filter (None: any)."""
        singles = (task, outcome, policy_version, run_id)
        return cls(*(None if value is None else (value,) for value in singles))

    def as_dict(self) -> dict[str, Any]:
        """The given filters as JSON-able values (outcomes as strings), for metadata and messages."""
        data: dict[str, Any] = {
            name: [str(getattr(value, "value", value)) for value in getattr(self, name)]
            for name in _QUERY_FIELDS
            if getattr(self, name) is not None
        }
        return data | ({"max_per_task": self.max_per_task} if self.max_per_task is not None else {})

    def __str__(self) -> str:
        given = ", ".join(
            f"{name}={('|'.join(values) if isinstance(values, list) else values)!r}"
            for name, values in self.as_dict().items()
        )
        return f"episodes with {given}" if given else "all episodes"


_QUERY_FIELDS = ("tasks", "outcomes", "policy_versions", "run_ids")


# The numpy array fields every ``EpisodeRecord`` has (``privileged`` and ``images`` are optional).
ARRAY_FIELDS = (
    "states",
    "actions",
    "rewards",
    "terminated",
    "truncated",
    "sources",
    "chunk_ids",
    "chunk_offsets",
    "latency_ms",
    "chunks",
)

#: ``EpisodeRecord`` fields that live in memory only: the store and the spool neither write nor expect them.
IN_MEMORY_FIELDS = frozenset({"chunk_embeddings"})


@dataclass
class EpisodeRecord:
    """One finished episode, columnar.

    Per-step arrays (first axis T): ``states`` T×S float32, ``actions`` (executed) T×D float32, ``rewards``
    T float32, ``terminated`` / ``truncated`` T bool, ``sources`` T uint8 (``StepSource``),
    ``policy_versions`` T str (the version that produced each step's chunk), ``chunk_ids`` T int32 (row in
    ``chunks``, −1 for steps not from a chunk), ``chunk_offsets`` T int32 (index of the action inside its
    chunk), ``latency_ms`` T float32 (inference latency of the chunk, 0 where none). ``chunks`` is K×H×D
    float32: the predicted chunks. ``images`` maps camera → T×h×w×3 uint8 (optional). ``privileged`` is T×P
    float32 simulator state (optional; sim only — value models and state-based baselines may use it, deployed
    policies never do). ``subtasks`` optionally labels each step with a subtask name. ``prompt`` is the
    language instruction the episode ran under (None: the task's default). ``injected`` optionally marks
    each step with the kind of bad segment an env wrapper injected there (None: a clean step): the ground
    truth that label diagnostics compare against. ``reference_chunks`` (optional, shaped as ``chunks``) holds for
    each chunk the one a refining policy started from (RLT: the prior's ``ã``; ``chunks`` is then what it
    executed). ``final_observation`` (optional) is the observation after the last step of an episode cut by a
    time limit (outcome ``TRUNCATED``; gymnasium's ``final_observation``): ``state``, ``prompt``,
    ``privileged`` exactly when the steps have it and the steps' cameras (none when they recorded no images);
    a learner bootstraps its last transition from it. ``chunk_embeddings`` (optional, ``K×T×E`` float32, one row
    per chunk) holds the policy's backbone embeddings at each chunk (``ActionChunk.embeddings``) when the rollout
    recorded them (``RolloutWorker(record_embeddings=True)``, RLT): they travel with the record to a learner in
    the same process or over Ray, but no store or spool keeps them (``IN_MEMORY_FIELDS``).
    """

    uuid: uuid.UUID
    task: str
    env_id: str
    policy_version: str | None
    seed: int | None
    outcome: Outcome
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    sources: np.ndarray
    policy_versions: list[str | None]
    chunk_ids: np.ndarray
    chunk_offsets: np.ndarray
    latency_ms: np.ndarray
    chunks: np.ndarray
    images: dict[str, np.ndarray] = field(default_factory=dict)
    privileged: np.ndarray | None = None
    interventions: list[InterventionSegment] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    error: str | None = None
    subtasks: list[str | None] | None = None
    prompt: str | None = None
    injected: list[str | None] | None = None
    reference_chunks: np.ndarray | None = None
    final_observation: Observation | None = None
    chunk_embeddings: np.ndarray | None = None

    @property
    def length(self) -> int:
        """Number of steps T."""
        return int(self.actions.shape[0])

    def validate(self) -> None:
        """Check every field's type, shape, dtype, range and finiteness, and the store's column limits (see the
        module docstring: a ``StoreLimitError``); raise ``EpisodeValidationError``.

        Nothing is converted: an array of the wrong dtype is an error (the message names the field, the
        expected dtype and shape, and what was given), so what is stored is exactly what was validated.
        """
        _check_type("uuid", self.uuid, uuid.UUID, "a uuid.UUID")
        _check_name("task", self.task, limits.TASK)
        _check_name("env_id", self.env_id, limits.ENV_ID)
        _check_optional_name("policy_version", self.policy_version, limits.POLICY_VERSION)
        _check_optional_name("run_id", self.run_id, limits.RUN_ID)
        if self.seed is not None:
            _check_int("seed", self.seed, limits.SEED)
        parse_outcome(self.outcome)
        if self.error is not None:
            if not isinstance(self.error, str):
                raise EpisodeValidationError("error", "a str or None", repr(self.error))
            _check_text("error", self.error, None)
        _check_array("actions", self.actions, np.float32, 2, finite=True)
        steps = self.length
        _check_array("states", self.states, np.float32, 2, steps, finite=True)
        _check_array("rewards", self.rewards, np.float32, 1, steps, finite=True)
        _check_array("terminated", self.terminated, np.bool_, 1, steps)
        _check_array("truncated", self.truncated, np.bool_, 1, steps)
        _check_array("sources", self.sources, np.uint8, 1, steps)
        _check_range("sources", self.sources, 0, max(StepSource), "a StepSource value (0=policy, 1=human)")
        _check_array("latency_ms", self.latency_ms, np.float32, 1, steps, finite=True)
        _check_range("latency_ms", self.latency_ms, 0, math.inf, "non-negative milliseconds")
        _check_per_step_names("policy_versions", self.policy_versions, steps, limits.POLICY_VERSION)
        if self.subtasks is not None:
            _check_per_step_names("subtasks", self.subtasks, steps, limits.SUBTASK)
        if self.injected is not None:
            _check_per_step_names("injected", self.injected, steps, limits.INJECTED)
        if self.prompt is not None:
            if not isinstance(self.prompt, str):
                raise EpisodeValidationError("prompt", "a str or None", repr(self.prompt))
            _check_text("prompt", self.prompt, None)
        self._validate_chunks(steps)
        self._validate_images(steps)
        if self.privileged is not None:
            _check_array("privileged", self.privileged, np.float32, 2, steps, finite=True)
        self._validate_interventions(steps)
        _check_json("metadata", self.metadata)
        if self.final_observation is not None:
            self._validate_final_observation()

    def _validate_chunks(self, steps: int) -> None:
        _check_array("chunks", self.chunks, np.float32, 3, finite=True)
        n_chunks, horizon, action_dim = self.chunks.shape
        if n_chunks and action_dim != self.actions.shape[1]:
            raise EpisodeValidationError(
                "chunks", f"action dim {self.actions.shape[1]} (as actions)", f"shape {self.chunks.shape}"
            )
        _check_array("chunk_ids", self.chunk_ids, np.int32, 1, steps)
        _check_range(
            "chunk_ids", self.chunk_ids, -1, n_chunks - 1, f"-1 or a row of chunks (0..{n_chunks - 1})"
        )
        _check_array("chunk_offsets", self.chunk_offsets, np.int32, 1, steps)
        from_chunk = self.chunk_offsets[self.chunk_ids >= 0]
        _check_range(
            "chunk_offsets", from_chunk, 0, horizon - 1, f"an index into the chunk (0..{horizon - 1})"
        )
        if self.reference_chunks is not None:
            _check_array("reference_chunks", self.reference_chunks, np.float32, 3, finite=True)
            if self.reference_chunks.shape != self.chunks.shape:
                raise EpisodeValidationError(
                    "reference_chunks",
                    f"shape {self.chunks.shape} (as chunks)",
                    f"shape {self.reference_chunks.shape}",
                )
        if self.chunk_embeddings is not None:
            _check_array("chunk_embeddings", self.chunk_embeddings, np.float32, 3, n_chunks, finite=True)

    def _validate_images(self, steps: int) -> None:
        if not isinstance(self.images, dict):
            raise EpisodeValidationError(
                "images", "a dict camera -> T×h×w×3 uint8", type(self.images).__name__
            )
        for camera, frames in self.images.items():
            _check_name("images camera name", camera, limits.CAMERA)
            _check_array(f"images[{camera!r}]", frames, np.uint8, 4, steps)
            if frames.shape[3] != 3:
                raise EpisodeValidationError(f"images[{camera!r}]", "T×h×w×3 (RGB)", f"shape {frames.shape}")

    def _validate_final_observation(self) -> None:
        """A truncated episode's observation after its last step, shaped as its steps' observations."""
        name, final = "final_observation", self.final_observation
        if Outcome(self.outcome) != Outcome.TRUNCATED or not self.length:
            raise EpisodeValidationError(
                name, "None unless the episode is truncated", f"outcome {self.outcome}"
            )
        keys = {"state", "prompt", "images"} | ({"privileged"} if self.privileged is not None else set())
        if not isinstance(final, dict) or set(final) != keys:
            got = sorted(final) if isinstance(final, dict) else type(final).__name__
            raise EpisodeValidationError(
                name, f"an observation with exactly the keys {sorted(keys)}", str(got)
            )
        _check_row(f"{name}.state", final["state"], self.states, finite=True)
        if self.privileged is not None:
            _check_row(f"{name}.privileged", final["privileged"], self.privileged, finite=True)
        if not isinstance(final["prompt"], str):
            raise EpisodeValidationError(f"{name}.prompt", "a str", repr(final["prompt"])[:60])
        _check_text(f"{name}.prompt", final["prompt"], None)
        images = final["images"]
        if not isinstance(images, dict) or sorted(images) != sorted(self.images):
            got = sorted(images) if isinstance(images, dict) else type(images).__name__
            raise EpisodeValidationError(
                f"{name}.images", f"the steps' cameras {sorted(self.images)}", str(got)
            )
        for camera, frame in images.items():
            _check_row(f"{name}.images[{camera!r}]", frame, self.images[camera])

    def _validate_interventions(self, steps: int) -> None:
        for index, segment in enumerate(self.interventions):
            name = f"interventions[{index}]"
            _check_type(name, segment, InterventionSegment, "an InterventionSegment")
            if not (0 <= segment.t_start < segment.t_end <= steps):
                raise EpisodeValidationError(
                    name,
                    f"0 <= t_start < t_end <= T={steps}",
                    f"t_start={segment.t_start}, t_end={segment.t_end}",
                )
            _check_name(f"{name}.trigger", segment.trigger, limits.TRIGGER)


@dataclass(frozen=True)
class TaskSpec:
    """What every episode of one task must look like; ``None`` accepts anything.

    ``state_dims``: the allowed state sizes S; ``action_dim``: D; ``privileged_dim``: P when privileged state
    is recorded (it is optional); ``cameras``: the camera names an episode may record (any subset, or none).
    """

    state_dims: frozenset[int] | None = None
    action_dim: int | None = None
    privileged_dim: int | None = None
    cameras: frozenset[str] | None = None

    def check(self, record: EpisodeRecord) -> None:
        """Raise ``EpisodeValidationError`` naming the field if ``record`` (already validated) does not fit."""
        where = f" for task {record.task!r}"
        state_dim = int(record.states.shape[1])
        if self.state_dims is not None and state_dim not in self.state_dims:
            sizes = " or ".join(str(n) for n in sorted(self.state_dims))
            raise EpisodeValidationError("states", f"state size {sizes}{where}", f"{state_dim}")
        if self.action_dim is not None and record.actions.shape[1] != self.action_dim:
            raise EpisodeValidationError(
                "actions", f"action size {self.action_dim}{where}", f"{record.actions.shape[1]}"
            )
        privileged = record.privileged
        if privileged is not None and self.privileged_dim not in (None, privileged.shape[1]):
            raise EpisodeValidationError(
                "privileged", f"size {self.privileged_dim}{where}", f"{privileged.shape[1]}"
            )
        unknown = sorted(set(record.images) - self.cameras) if self.cameras is not None else []
        if unknown:
            raise EpisodeValidationError(
                "images camera name", f"one of {sorted(self.cameras or ())}{where}", repr(unknown[0])
            )


@dataclass(frozen=True)
class EpisodeSummary:
    """One row of the episode index: what ``list_episodes`` returns (no per-step data)."""

    uuid: uuid.UUID
    task: str
    env_id: str
    policy_version: str | None
    seed: int | None
    outcome: Outcome
    length: int
    total_reward: float
    human_steps: int
    run_id: str | None
    error: str | None
    metadata: dict[str, Any]
    created_at: dt.datetime
    prompt: str | None = None


@dataclass
class EpisodeLabels:
    """Per-step labels of one episode under one relabel version (arrays of length T).

    ``values`` and ``advantages`` are float32, ``indicators`` bool (the improvement indicator 1[A > ε]).
    """

    episode_uuid: uuid.UUID
    values: np.ndarray
    advantages: np.ndarray
    indicators: np.ndarray

    def validate(self, length: int | None = None) -> None:
        """Check dtypes, equal lengths (``length`` if given) and finiteness; raise EpisodeValidationError."""
        name = f"labels[{self.episode_uuid}]"
        _check_type(f"{name}.episode_uuid", self.episode_uuid, uuid.UUID, "a uuid.UUID")
        _check_array(f"{name}.values", self.values, np.float32, 1, length, finite=True)
        steps = self.values.shape[0]
        _check_array(f"{name}.advantages", self.advantages, np.float32, 1, steps, finite=True)
        _check_array(f"{name}.indicators", self.indicators, np.bool_, 1, steps)


@dataclass
class RelabelRecord:
    """A relabel version: per-step value/advantage/indicator for a set of episodes, with its lineage.

    Relabels are never overwritten: writing one creates a new version. ``parent_id`` names the relabel it
    refines (if any), ``value_model_version`` the value model that produced it, ``config`` the settings and
    ``diagnostics`` the label-quality figures computed when it was made.
    """

    method: str
    labels: list[EpisodeLabels]
    value_model_version: str | None = None
    parent_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    relabel_id: str | None = None
    version: int | None = None
    created_at: dt.datetime | None = None

    def validate(self) -> None:
        """Check the method name, JSON-ability of config/diagnostics and every episode's labels."""
        _check_name("method", self.method, limits.RELABEL_METHOD)
        _check_optional_name("value_model_version", self.value_model_version, limits.VALUE_MODEL_VERSION)
        _check_optional_name("parent_id", self.parent_id, limits.RELABEL_ID)
        _check_json("config", self.config)
        _check_json("diagnostics", self.diagnostics)
        seen: set[uuid.UUID] = set()
        for labels in self.labels:
            _check_type("labels[]", labels, EpisodeLabels, "EpisodeLabels")
            if labels.episode_uuid in seen:
                raise EpisodeValidationError(
                    "labels", "each episode at most once", f"{labels.episode_uuid} twice"
                )
            seen.add(labels.episode_uuid)
            labels.validate()


def _check_type(name: str, value: Any, expected_type: type, expected: str) -> None:
    if not isinstance(value, expected_type):
        raise EpisodeValidationError(name, expected, f"{type(value).__name__} {value!r:.60}")


def _check_name(name: str, value: Any, column: ColumnLimit) -> None:
    if not isinstance(value, str) or not value:
        raise EpisodeValidationError(name, "a non-empty str", repr(value)[:80])
    _check_text(name, value, column)


def _check_optional_name(name: str, value: Any, column: ColumnLimit) -> None:
    if value is not None:
        _check_name(name, value, column)


def _check_text(name: str, value: str, column: ColumnLimit | None) -> None:
    """Refuse what a text column (or a JSON string, ``column=None``) cannot hold on some backend."""
    problem = _text_problem(value, column)
    if problem is not None:
        raise StoreLimitError(name, *problem)


def _text_problem(value: str, column: ColumnLimit | None) -> tuple[str, str] | None:
    """(expected, got) if ``value`` is longer than ``column`` holds or has a NUL byte or a lone surrogate."""
    if column is not None and column.length is not None and len(value) > column.length:
        return f"at most {column.length} characters (column {column.column})", f"{len(value)} characters"
    if "\x00" in value:
        return "text without NUL bytes (PostgreSQL refuses them)", f"NUL at index {value.index(chr(0))}"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return "valid Unicode text (no lone surrogates)", f"{value[error.start]!r} at index {error.start}"
    return None


def _check_int(name: str, value: Any, column: ColumnLimit) -> None:
    """Refuse a non-int or an int outside the signed range of ``column``'s integer type."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise EpisodeValidationError(name, "an int or None", repr(value)[:80])
    bits = column.bits or 64
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        where = f"column {column.column}"
        raise StoreLimitError(name, f"a signed {bits}-bit integer (|n| < 2^{bits - 1}, {where})", str(value))


def _check_per_step_names(name: str, values: Any, steps: int, column: ColumnLimit) -> None:
    if not isinstance(values, list) or len(values) != steps:
        got = (
            f"{type(values).__name__} of length {len(values)}" if hasattr(values, "__len__") else repr(values)
        )
        raise EpisodeValidationError(name, f"a list of T={steps} str-or-None", got)
    try:
        distinct: Any = set(values)
    except TypeError:  # unhashable entries: check them one by one
        distinct = values
    for value in distinct:  # few distinct values: check each once, report the first bad index
        if value is not None:
            first = values.index(value)
            if not isinstance(value, str) or not value:
                raise EpisodeValidationError(f"{name}[{first}]", "a non-empty str or None", repr(value)[:80])
            _check_text(f"{name}[{first}]", value, column)


def _check_array(
    name: str,
    array: Any,
    dtype: type,
    ndim: int,
    length: int | None = None,
    *,
    finite: bool = False,
) -> None:
    """Raise unless ``array`` is an ndarray of ``dtype`` with ``ndim`` axes, first axis ``length``, finite."""
    ok = isinstance(array, np.ndarray) and array.dtype == dtype and array.ndim == ndim
    if not ok or (length is not None and array.shape[0] != length):
        axes = "×".join(["T" if length is None else f"T={length}", *("?" * (ndim - 1))])
        expected = f"{np.dtype(dtype).name} array of shape {axes}"
        if not isinstance(array, np.ndarray):
            raise EpisodeValidationError(name, expected, type(array).__name__)
        raise EpisodeValidationError(name, expected, f"{array.dtype.name} array of shape {array.shape}")
    if finite and array.size and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        raise EpisodeValidationError(
            name, "finite values (no NaN/inf)", f"{array[tuple(bad)]} at {tuple(bad)}"
        )


def _check_row(name: str, row: Any, steps: np.ndarray, *, finite: bool = False) -> None:
    """Raise unless ``row`` is shaped and typed as one row of the per-step array ``steps``."""
    expected = f"{steps.dtype.name} array of shape {steps.shape[1:]}"
    if not isinstance(row, np.ndarray) or row.dtype != steps.dtype or row.shape != steps.shape[1:]:
        got = (
            f"{row.dtype.name} array of shape {row.shape}"
            if isinstance(row, np.ndarray)
            else type(row).__name__
        )
        raise EpisodeValidationError(name, expected, got)
    if finite and not np.isfinite(row).all():
        raise EpisodeValidationError(name, "finite values (no NaN/inf)", "a NaN or inf")


def _check_range(name: str, array: np.ndarray, low: float, high: float, expected: str) -> None:
    if array.size and (array.min() < low or array.max() > high):
        bad = array[(array < low) | (array > high)][0]
        raise EpisodeValidationError(name, expected, repr(bad.item()))


def _check_json(name: str, value: Any) -> None:
    """A JSON object both backends store as given: str (or int) keys, JSON values only, finite floats, valid
    text, at most ``MAX_JSON_DEPTH`` levels (walked with an explicit stack: no recursion, whatever the depth).

    The error names ``name`` as the field and says where inside it the problem is."""
    if not isinstance(value, dict):
        raise EpisodeValidationError(name, "a JSON object (dict)", type(value).__name__)
    stack: list[tuple[dict[Any, Any] | list[Any] | tuple[Any, ...], int, _Path]] = [(value, 1, (name, None))]
    while stack:
        container, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            expected = f"JSON nested at most {MAX_JSON_DEPTH} levels"
            raise StoreLimitError(name, expected, f"deeper, at {_render(path)[:100]}")
        is_dict = isinstance(container, dict)
        for key, child in container.items() if is_dict else enumerate(container):
            problem = _json_key_problem(key) if is_dict else None
            if problem is None and not isinstance(child, dict | list | tuple):
                problem = _json_scalar_problem(child)
            if problem is not None:
                error, expected, got = problem
                raise error(name, expected, f"{got} at {_render((key, path))[:100]}")
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1, (key, path)))


_Problem = tuple[type[EpisodeValidationError], str, str]


def _json_key_problem(key: Any) -> _Problem | None:
    if isinstance(key, str):
        problem = _text_problem(key, None)
        return None if problem is None else (StoreLimitError, f"keys of {problem[0]}", problem[1])
    if not isinstance(key, int):
        return EpisodeValidationError, "str or int keys", f"key {key!r:.60}"
    return None


def _json_scalar_problem(item: Any) -> _Problem | None:
    if isinstance(item, str):
        problem = _text_problem(item, None)
        return None if problem is None else (StoreLimitError, *problem)
    if isinstance(item, float) and not math.isfinite(item):
        return StoreLimitError, "finite numbers (JSON has no NaN/inf)", repr(item)
    if isinstance(item, int) and item.bit_length() > _MAX_JSON_INT_BITS:
        return StoreLimitError, f"integers of at most {_MAX_JSON_INT_BITS} bits", f"{item.bit_length()} bits"
    if item is not None and not isinstance(item, str | float | int):
        return (
            EpisodeValidationError,
            "JSON values (dict, list, str, int, float, bool, None)",
            type(item).__name__,
        )
    return None


_Path = tuple[Any, "_Path | None"]
"""A JSON location as (key, parent): built per value without copying, rendered only for an error."""


def _render(path: _Path) -> str:
    keys = []
    node: _Path | None = path
    while node is not None:
        keys.append(node[0])
        node = node[1]
    root, *rest = reversed(keys)
    return str(root) + "".join(f"[{key!r}]" for key in rest)
