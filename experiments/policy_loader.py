"""The one policy loader: turn a spec or a registered version into a ``Policy``; registering it is a separate step.

Specs (:func:`resolve` names each one's kind; :func:`load` dispatches on it):

- ``scripted[:<task>][?noise=<std>][&object_bias=x,y,z][&goal_bias=x,y,z]``: Meta-World's scripted expert (reads
  ``privileged``; without a task it takes the caller's, else each observation's prompt), optionally with a
  systematic error in metres (``envs.experts.ScriptedExpert``). ``scripted`` is version
  ``scripted-noise<std>`` (``envs.scripted.scripted_version``), ``scripted:<task>…`` is versioned by its spec;
- a checkpoint directory: its ``policy.json`` (``policies.manifest``) says ``vla``, ``hierarchical``
  (``policies.hierarchical``) or ``rlt`` (``rlt.checkpoint``: its prior until the hand-off, then the RLT actor,
  ``rlt.actor.RLTActor``; the prior loads through here, so nested RLT works);
- ``openpi:ws://host:port[?option=value&...]``: any openpi-compatible server (options: :data:`OPENPI_OPTIONS`;
  e.g. ``openpi:ws://gpu:8000?keys=libero&horizon=10&dim=7&api_key_env=PI_KEY`` for a π0.5 LIBERO server
  whose metadata is ``{}``);
- ``python:<module>:<name>[?option=value&...]``: a policy class or factory of the user's, called with the options
  (numbers where they parse as numbers) and ``seed`` — e.g. a scripted demonstrator for one's own gymnasium env,
  ``python:policies.gym_experts:ReacherExpert?noise_std=0.3``; versioned by the policy's ``version``;
- ``@FILE``: the spec FILE holds (a deploy file);
- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: a version of a model registered in MLflow (the
  configured tracking store, ``experiments.paths.default_mlflow_uri``); its checkpoint is downloaded once and loads
  as the directory it holds;
- a version registered in the store: one indexed lookup (``ExperienceStore.policy_version``), then its ``uri``,
  itself one of the specs above, loads under the registered name.

:func:`register` records a loaded policy in the store, with a ``uri`` that reloads it; only callers whose
episodes or evaluations name the version call it. A scripted prior and a distance hand-off read
``privileged`` (the simulator state), so serving such a policy to observations without it fails with a
one-line error naming ``privileged``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from experiments.mlflow_policy import MODELS_PREFIX, download_policy
from policies.base import Policy
from policies.manifest import HIERARCHICAL_KIND, RLT_KIND, VLA_KIND, ManifestError, checkpoint_kind

if TYPE_CHECKING:
    from rlt.checkpoint import RLTManifest
    from storage import ExperienceStore

SCRIPTED, OPENPI, PYTHON = "scripted", "openpi", "python"
OPENPI_PREFIX = "openpi:"
PYTHON_PREFIX = "python:"
#: Options of an ``openpi:`` spec's query string.
OPENPI_OPTIONS = {
    "keys": "openpi field names: libero or droid (cameras main/wrist, exterior/wrist)",
    "key": "one field-name entry, repeatable: image:<camera>=<wire key>, state=<wire key>, prompt=<wire key>",
    "horizon": "action horizon H (needed if the server's metadata lacks it; may cut a longer chunk)",
    "dim": "action dimension D (needed if the server's metadata lacks it)",
    "api_key_env": "environment variable holding the server's API key",
    "version": "policy version to record if the server names none",
    "privileged": "1 to send the simulator state (simulated robots with a scripted server only)",
    "connections": "concurrent lock-step connections for a batch",
    "timeout_s": "seconds to wait for the server to come up and for each reply",
}


class PolicySpecError(ValueError):
    """A policy spec names nothing flywheel can load."""


@dataclass(frozen=True)
class PolicySource:
    """What a spec names: the ``kind`` to load, the ``uri`` (a spec) that reloads it, and the registered
    ``version`` it was named by, if it was."""

    kind: str
    uri: str
    version: str | None = None


def resolve(spec: str, store: ExperienceStore | None = None, *, noise: float = 0.0) -> PolicySource:
    """The kind and reloadable uri of ``spec`` (see the module doc); ``noise`` is a bare ``scripted``
    expert's action noise; a registered version needs ``store``."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise PolicySpecError(f"policy {spec!r}: {path} is not a file")
        named = path.read_text().strip()
        if not named:
            raise PolicySpecError(f"policy {spec!r}: {path} is empty (it should name a policy)")
        return resolve(named, store, noise=noise)
    if not spec:
        raise PolicySpecError("policy: empty spec")
    if spec == SCRIPTED or spec.startswith((f"{SCRIPTED}:", f"{SCRIPTED}?")):
        task, spec_noise, biases = parse_scripted_spec(spec)
        bare = spec == SCRIPTED
        return PolicySource(SCRIPTED, scripted_spec(noise if bare else spec_noise, task, biases))
    if spec.startswith(OPENPI_PREFIX):
        return PolicySource(OPENPI, spec)
    if spec.startswith(PYTHON_PREFIX):
        parse_python_spec(spec)
        return PolicySource(PYTHON, spec)
    if spec.startswith(MODELS_PREFIX):
        return resolve(str(_mlflow_checkpoint(spec)))
    if Path(spec).is_dir():
        return PolicySource(_checkpoint_kind(Path(spec)), str(Path(spec).resolve()))
    return _registered(spec, store)


def load(
    spec: str | PolicySource,
    *,
    task: str | None = None,
    store: ExperienceStore | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> Policy:
    """The ``Policy`` ``spec`` names, for ``task`` (``None``: the checkpoint's, or each prompt's for a
    scripted expert); ``store`` resolves registered versions (also an RLT checkpoint's stored prior)."""
    source = spec if isinstance(spec, PolicySource) else resolve(spec, store, noise=noise)
    return _LOADERS[source.kind](source, task, store, seed)


def register(store: ExperienceStore, source: PolicySource, version: str) -> None:
    """Record ``version``, loaded from ``source``, in ``store`` (idempotent) so episodes and evaluations can
    name it; its ``uri`` reloads it. An RLT policy's parent is its prior (a scripted prior is registered too)."""
    parent, metadata = None, {}
    if source.kind == SCRIPTED:
        _, noise, biases = parse_scripted_spec(source.uri)
        metadata = {"noise_std": noise} | biases
    elif source.kind == OPENPI:
        metadata = _openpi_metadata(parse_openpi_spec(source.uri)[1])
    elif source.kind == RLT_KIND:
        prior = _rlt_manifest(Path(source.uri)).deployment.prior
        if prior.scripted_noise is not None:
            biases = {"object_bias": prior.object_bias, "goal_bias": prior.goal_bias}
            register(
                store,
                PolicySource(SCRIPTED, scripted_spec(prior.scripted_noise, None, biases)),
                prior.version,
            )
        parent = prior.version
    store.register_policy_version(version, kind=source.kind, uri=source.uri, parent=parent, metadata=metadata)


def checkpoint_directory(spec: str, store: ExperienceStore) -> Path:
    """The built-in VLA checkpoint directory ``spec`` names (a directory or a registered version)."""
    source = resolve(spec, store)
    if source.kind != VLA_KIND:
        raise PolicySpecError(f"policy {spec!r}: a {source.kind} policy, not a VLA checkpoint directory")
    return Path(source.uri)


def vla_image_layout(spec: str, store: ExperienceStore) -> tuple[tuple[str, ...], int] | None:
    """Cameras and square image side of the built-in VLA ``spec`` names (read from its config, no weights), or
    None when ``spec`` names another kind of policy (scripted, openpi, …) or nothing loadable."""
    from policies.checkpoint import checkpoint_config

    try:
        directory = checkpoint_directory(spec, store)
    except PolicySpecError:
        return None
    config = checkpoint_config(directory)
    return tuple(config.cameras), config.image_size


#: A scripted expert's systematic errors (``envs.experts.ScriptedExpert`` arguments, metres xyz) in its spec.
SCRIPTED_BIASES = ("object_bias", "goal_bias")
Bias = tuple[float, float, float]


def scripted_spec(
    noise: float, task: str | None = None, biases: Mapping[str, Bias | None] | None = None
) -> str:
    """The spec (and registered uri) of the scripted expert with action noise ``noise`` and ``biases``
    (``object_bias`` / ``goal_bias``; None or zero ones are left out)."""
    options = [f"noise={noise:g}"] if noise else []
    for name, bias in (biases or {}).items():
        if bias is not None and any(bias):
            options.append(f"{name}=" + ",".join(f"{value:g}" for value in bias))
    return f"{SCRIPTED}{f':{task}' if task else ''}{'?' + '&'.join(options) if options else ''}"


def parse_scripted_spec(spec: str) -> tuple[str | None, float, dict[str, Bias]]:
    """``scripted[:<task>][?noise=<std>][&object_bias=x,y,z][&goal_bias=x,y,z]`` → its task (None if unnamed),
    action noise and biases (only those given)."""
    name, _, query = spec.partition("?")
    task = name.removeprefix(SCRIPTED).removeprefix(":") or None
    noise, biases = 0.0, {}
    for entry in filter(None, query.split("&")):
        option, _, value = entry.partition("=")
        if option in SCRIPTED_BIASES:
            biases[option] = _bias(spec, option, value)
            continue
        if option != "noise":
            known = ", ".join(("noise", *SCRIPTED_BIASES))
            raise PolicySpecError(f"policy {spec!r}: unknown option {option!r}; known: {known}")
        try:
            noise = float(value)
        except ValueError:
            noise = -1.0
        if not noise >= 0:
            raise PolicySpecError(f"policy {spec!r}: noise={value!r}; expected a number >= 0")
    return task, noise, biases


def _bias(spec: str, option: str, value: str) -> Bias:
    """A bias option's ``x,y,z`` (metres)."""
    try:
        x, y, z = (float(part) for part in value.split(","))
    except ValueError:
        raise PolicySpecError(f"policy {spec!r}: {option}={value!r}; expected x,y,z in metres") from None
    return (x, y, z)


def _registered(version: str, store: ExperienceStore | None) -> PolicySource:
    if store is None:
        raise PolicySpecError(
            f"policy {version!r}: not 'scripted[:<task>]', 'openpi:ws://…', a checkpoint directory or @FILE; "
            "pass the experience store (--db) to look up a registered version"
        )
    from storage import SchemaNotReadyError

    try:
        row = store.policy_version(version)
    except SchemaNotReadyError:
        raise PolicySpecError(
            f"policy {version!r}: not 'scripted[:<task>]', 'openpi:ws://…', a checkpoint directory or @FILE, "
            f"and the store {store.safe_url} has no registered versions (no schema: flywheel db upgrade)"
        ) from None
    if row is None:
        raise PolicySpecError(
            f"policy {version!r}: no such version registered in {store.safe_url} "
            "(nor is it 'scripted[:<task>]', 'openpi:ws://…', a checkpoint directory or @FILE)"
        )
    uri = _loadable_uri(row)
    if uri is None or uri.startswith("@") or not (Path(uri).is_dir() or _is_spec(uri)):
        raise PolicySpecError(
            f"policy version {version!r} ({row['kind']}) has no loadable uri here (uri={row['uri']!r})"
        )
    return replace(resolve(uri), version=version)


def _mlflow_checkpoint(spec: str) -> Path:
    """The local checkpoint directory of a ``models:/`` spec (``experiments.mlflow_policy.download_policy``)."""
    try:
        return download_policy(spec)
    except (LookupError, OSError) as error:
        raise PolicySpecError(str(error)) from None


def _loadable_uri(row: dict[str, Any]) -> str | None:
    """A row's uri as a spec, also for rows registered before every uri was one: a scripted version had none
    (its noise is in the metadata), an openpi version had the bare server URL."""
    uri, kind = row["uri"], row["kind"]
    if kind == SCRIPTED and uri is None:
        return scripted_spec(float((row["metadata"] or {}).get("noise_std", 0.0)))
    if kind == OPENPI and uri and not uri.startswith(OPENPI_PREFIX):
        return OPENPI_PREFIX + uri
    return uri


def _is_spec(uri: str) -> bool:
    return uri == SCRIPTED or uri.startswith((f"{SCRIPTED}:", f"{SCRIPTED}?", OPENPI_PREFIX, PYTHON_PREFIX))


def _checkpoint_kind(directory: Path) -> str:
    try:
        kind = checkpoint_kind(directory)
    except ManifestError as error:
        raise PolicySpecError(str(error)) from None
    if kind is None:
        raise PolicySpecError(f"policy {str(directory)!r}: no checkpoint in this directory (no policy.json)")
    return kind


def _load_scripted(source: PolicySource, task: str | None, store: Any, seed: int) -> Policy:
    from envs.scripted import ScriptedPolicy, scripted_version

    own_task, noise, biases = parse_scripted_spec(source.uri)
    if own_task and task and own_task != task:
        raise PolicySpecError(
            f"policy {source.version or source.uri!r}: the scripted expert of {own_task!r}, not {task!r}"
        )
    version = source.version or (source.uri if own_task else scripted_version(noise, **biases))
    return ScriptedPolicy(own_task or task, noise_std=noise, seed=seed, version=version, **biases)


def _load_vla(source: PolicySource, task: str | None, store: Any, seed: int) -> Policy:
    from policies.checkpoint import load_checkpoint

    return load_checkpoint(source.uri, **({"version": source.version} if source.version else {}))


def _load_hierarchical(source: PolicySource, task: str | None, store: Any, seed: int) -> Policy:
    from policies.hierarchical import load_hierarchical

    return load_hierarchical(source.uri)


def _load_rlt(source: PolicySource, task: str | None, store: ExperienceStore | None, seed: int) -> Policy:
    """An RLT checkpoint as the policy it deploys (``experiments.pipeline_rlt.load_rlt_policy``); ``task``
    (default: the checkpoint's) must be the task it was trained on."""
    from experiments.pipeline_rlt import load_rlt_policy
    from rlt.errors import RLTInputError

    directory = Path(source.uri)
    manifest = _rlt_manifest(directory)
    task = task or manifest.deployment.task
    if manifest.deployment.task != task:
        raise PolicySpecError(
            f"RLT checkpoint {directory} was trained on {manifest.deployment.task!r}, not {task!r}"
        )
    version = source.version or manifest.rl_version
    try:
        return load_rlt_policy(
            directory, version, task, lambda prior: load(prior, task=task, store=store, seed=seed)
        )
    except RLTInputError as error:
        raise PolicySpecError(str(error)) from None


def _rlt_manifest(directory: Path) -> RLTManifest:
    """An RLT checkpoint's manifest (``rlt.checkpoint.read_rlt_manifest``; its errors are spec errors)."""
    from rlt.checkpoint import read_rlt_manifest
    from rlt.errors import RLTInputError

    try:
        return read_rlt_manifest(directory)
    except RLTInputError as error:
        raise PolicySpecError(str(error)) from None


def parse_python_spec(spec: str) -> tuple[Callable[..., Policy], dict[str, Any]]:
    """``python:<module>:<name>[?option=value&...]`` → the class or factory and its keyword options."""
    target, _, query = spec.removeprefix(PYTHON_PREFIX).partition("?")
    module_name, colon, name = target.rpartition(":")
    if not colon or not module_name or not name:
        raise PolicySpecError(
            f"policy {spec!r}: expected python:<module>:<class or factory>[?option=value&...]"
        )
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise PolicySpecError(
            f"policy {spec!r}: cannot load {name!r} from {module_name!r} ({error})"
        ) from None
    options: dict[str, Any] = {}
    for entry in filter(None, query.split("&")):
        option, separator, value = (unquote(part) for part in entry.partition("="))
        if not separator:
            raise PolicySpecError(f"policy {spec!r}: option {entry!r}: expected option=value")
        try:
            options[option] = json.loads(value)
        except ValueError:
            options[option] = value
    return factory, options


def _load_python(source: PolicySource, task: str | None, store: Any, seed: int) -> Policy:
    factory, options = parse_python_spec(source.uri)
    try:
        policy = factory(**({"seed": seed} | options))
    except TypeError as error:
        raise PolicySpecError(f"policy {source.uri!r}: {error}") from None
    if source.version:
        policy.version = source.version
    return policy


_LOADERS: dict[str, Callable[[PolicySource, str | None, Any, int], Policy]] = {
    SCRIPTED: _load_scripted,
    OPENPI: lambda source, task, store, seed: load_openpi(source.uri),
    VLA_KIND: _load_vla,
    HIERARCHICAL_KIND: _load_hierarchical,
    RLT_KIND: _load_rlt,
    PYTHON: _load_python,
}


def load_openpi(spec: str) -> Policy:
    """Connect to the openpi-compatible server an ``openpi:`` spec names."""
    from policies.openpi_client import MissingMetadataError, OpenPIClientPolicy, ServerError

    url, options = parse_openpi_spec(spec)
    try:
        policy = OpenPIClientPolicy(url, **options)
    except MissingMetadataError as error:
        option = {"action_horizon": "horizon", "action_dim": "dim"}[error.name]
        raise PolicySpecError(
            f"policy {spec!r}: the server's metadata has no {error.name!r}; add {option}=N to the spec"
        ) from None
    except (ServerError, ValueError) as error:
        raise PolicySpecError(f"policy {spec!r}: {error}") from None
    return policy


def parse_openpi_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``openpi:ws://host:port?opt=value&...`` → the server URL and ``OpenPIClientPolicy`` keyword arguments."""
    parts = urlsplit(spec.removeprefix(OPENPI_PREFIX))
    if parts.scheme not in ("ws", "wss") or not parts.netloc or parts.fragment:
        raise PolicySpecError(f"policy {spec!r}: expected openpi:ws://host:port[?option=value&...]")
    url = parts._replace(query="").geturl()
    options: dict[str, Any] = {}
    entries: list[str] = []
    for entry in filter(None, parts.query.split("&")):
        name, separator, value = (unquote(part) for part in entry.partition("="))
        if not separator:
            raise PolicySpecError(f"policy {spec!r}: option {entry!r}: expected option=value")
        if name not in OPENPI_OPTIONS:
            raise PolicySpecError(
                f"policy {spec!r}: unknown option {name!r}; known: {', '.join(OPENPI_OPTIONS)}"
            )
        if name == "key":
            entries.append(value)
        else:
            options.update(_openpi_option(spec, name, value))
    if entries:
        if "keys" in options:
            raise PolicySpecError(f"policy {spec!r}: give keys= or key= entries, not both")
        options["keys"] = _key_map(spec, entries)
    return url, options


def _openpi_option(spec: str, name: str, value: str) -> dict[str, Any]:
    from policies.serving import ObservationKeys

    if name == "keys":
        presets = {"libero": ObservationKeys.libero, "droid": ObservationKeys.droid}
        if value not in presets:
            raise PolicySpecError(
                f"policy {spec!r}: keys={value!r}; expected libero or droid (or key= entries)"
            )
        return {"keys": presets[value]()}
    if name in ("horizon", "dim", "connections"):
        keyword = {"horizon": "action_horizon", "dim": "action_dim", "connections": "connections"}[name]
        return {keyword: _positive(spec, name, value, int)}
    if name == "timeout_s":
        seconds = _positive(spec, name, value, float)
        return {"connect_timeout_s": seconds, "request_timeout_s": seconds}
    if name == "api_key_env":
        if not os.environ.get(value):
            raise PolicySpecError(f"policy {spec!r}: api_key_env: environment variable {value!r} is unset")
        return {"api_key": os.environ[value]}
    if name == "privileged":
        if value not in ("0", "1", "true", "false"):
            raise PolicySpecError(f"policy {spec!r}: privileged={value!r}; expected 1 or 0")
        return {"send_privileged": value in ("1", "true")}
    if not value:
        raise PolicySpecError(f"policy {spec!r}: version= needs a name")
    return {"version": value}


def _positive(spec: str, name: str, value: str, kind: type[int] | type[float]) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise PolicySpecError(f"policy {spec!r}: {name}={value!r}; expected a positive {kind.__name__}")
    return number


def _key_map(spec: str, entries: list[str]) -> Any:
    from policies.serving import ObservationKeys

    try:
        return ObservationKeys.parse(entries)
    except ValueError as error:
        raise PolicySpecError(f"policy {spec!r}: {error}") from None


def _openpi_metadata(options: dict[str, Any]) -> dict[str, Any]:
    """What to record about the client settings (never the API key itself)."""
    recorded = {k: v for k, v in options.items() if k not in ("api_key", "keys")}
    if "keys" in options:
        recorded["keys"] = {"images": dict(options["keys"].images), "prompt": options["keys"].prompt}
    return recorded
