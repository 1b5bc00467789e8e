"""Turn a policy spec from a config or the command line into a ``Policy`` — and record it in the store.

Specs: ``scripted`` (Meta-World's expert, ``noise`` sets its quality), a checkpoint directory of the built-in
VLA or of a hierarchical policy (``policies.hierarchical``), a policy version registered in the store
(resolved to its checkpoint), or ``openpi:ws://host:port[?option=value&...]`` for any openpi-compatible
server (options: :data:`OPENPI_OPTIONS`; e.g. ``openpi:ws://gpu:8000?keys=libero&horizon=10&dim=7
&api_key_env=PI_KEY`` for a π0.5 LIBERO server whose metadata is ``{}``).

An RLT checkpoint directory (``rlt.checkpoint``, written by ``flywheel rlt`` or the pipeline's RLT stage) or an
``rlt`` version loads as its prior until the hand-off and the deterministic RLT actor after it
(``experiments.pipeline_rlt.RLTDeployedPolicy``); its prior is loaded recursively, so nested RLT policies work.
A scripted prior and a distance hand-off read ``privileged`` (the simulator state), so serving such a policy to
observations without it fails with a one-line error naming ``privileged``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from policies.base import Policy
from storage import ExperienceStore

OPENPI_PREFIX = "openpi:"
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


def load_policy(spec: str, *, task: str, store: ExperienceStore, noise: float = 0.0, seed: int = 0) -> Policy:
    """Resolve ``spec`` to a ``Policy`` and make sure its version is registered in ``store``."""
    if spec == "scripted":
        from policies.scripted import ScriptedPolicy

        policy = ScriptedPolicy(task, noise_std=noise, seed=seed)
        store.register_policy_version(policy.version, kind="scripted", metadata={"noise_std": noise})
        return policy
    if spec.startswith(OPENPI_PREFIX):
        return load_openpi(spec, store)
    return _load_checkpoint(checkpoint_directory(spec, store), store, task)


def load_openpi(spec: str, store: ExperienceStore) -> Policy:
    """Connect to the openpi-compatible server an ``openpi:`` spec names and register its version."""
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
    store.register_policy_version(policy.version, kind="openpi", uri=url, metadata=_openpi_metadata(options))
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


def checkpoint_directory(spec: str, store: ExperienceStore) -> Path:
    """``spec`` as a checkpoint directory: the directory itself, or a registered version's."""
    directory = Path(spec)
    return directory if directory.is_dir() else _checkpoint_of_version(spec, store)


def _checkpoint_of_version(version: str, store: ExperienceStore) -> Path:
    for row in store.policy_versions():
        if row["version"] == version:
            if not row["uri"] or not Path(row["uri"]).is_dir():
                raise PolicySpecError(
                    f"policy version {version!r} has no checkpoint directory (uri={row['uri']!r})"
                )
            return Path(row["uri"])
    raise PolicySpecError(
        f"policy {version!r}: not 'scripted', 'openpi:ws://…', a checkpoint directory or a registered version"
    )


def _load_checkpoint(directory: Path, store: ExperienceStore, task: str) -> Policy:
    from experiments.pipeline_rlt import is_rlt_checkpoint
    from policies.checkpoint import load_checkpoint
    from policies.hierarchical import is_hierarchical_checkpoint, load_hierarchical

    if is_rlt_checkpoint(directory):
        return load_rlt(directory, store, task)
    if is_hierarchical_checkpoint(directory):
        policy = load_hierarchical(directory)
        store.register_policy_version(policy.version, kind="hierarchical", uri=str(directory.resolve()))
        return policy
    policy = load_checkpoint(directory)
    store.register_policy_version(policy.version, kind="vla", uri=str(directory.resolve()))
    return policy


def load_rlt(directory: Path, store: ExperienceStore, task: str | None = None) -> Policy:
    """An RLT checkpoint directory as the policy it deploys (``experiments.pipeline_rlt.load_rlt_policy``),
    registered in ``store`` (kind ``rlt``, parent = its prior); ``task`` (default: the checkpoint's) must be the
    task it was trained on."""
    from experiments.pipeline_rlt import RLT_KIND, load_rlt_policy
    from rlt.checkpoint import MANIFEST_FILE
    from rlt.deployment import RLTDeployment
    from rlt.errors import RLTInputError

    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    try:
        deployment = RLTDeployment.from_manifest(manifest)
    except RLTInputError as error:
        raise PolicySpecError(str(error)) from None
    task = task or deployment.task
    if deployment.task != task:
        raise PolicySpecError(f"RLT checkpoint {directory} was trained on {deployment.task!r}, not {task!r}")
    uri = str(directory.resolve())
    version = next((row["version"] for row in store.policy_versions() if row["uri"] == uri), None)
    version = version or manifest.get("rl_version") or directory.name
    try:
        policy = load_rlt_policy(
            directory, version, task, lambda spec: load_policy(spec, task=task, store=store)
        )
    except RLTInputError as error:
        raise PolicySpecError(str(error)) from None
    prior = deployment.prior
    if prior.scripted_noise is not None:
        store.register_policy_version(
            prior.version, kind="scripted", metadata={"noise_std": prior.scripted_noise}
        )
    store.register_policy_version(version, kind=RLT_KIND, uri=uri, parent=prior.version)
    return policy
