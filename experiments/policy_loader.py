"""Turn a policy spec from a config or the command line into a ``Policy`` — and record it in the store.

Specs: ``scripted`` (Meta-World's expert, ``noise`` sets its quality), a checkpoint directory of the built-in
VLA or of a hierarchical policy (``policies.hierarchical``), a policy version registered in the store
(resolved to its checkpoint), or ``openpi:ws://host:port`` for any openpi-compatible server.

An RLT checkpoint directory (``rlt.checkpoint``, written by ``flywheel rlt`` or the pipeline's RLT stage) or an
``rlt`` version loads as its prior until the hand-off and the deterministic RLT actor after it
(``experiments.pipeline_rlt.RLTDeployedPolicy``); its prior is loaded recursively, so nested RLT policies work.
A scripted prior and a distance hand-off read ``privileged`` (the simulator state), so serving such a policy to
observations without it fails with a one-line error naming ``privileged``.
"""

from __future__ import annotations

import json
from pathlib import Path

from policies.base import Policy
from storage import ExperienceStore

OPENPI_PREFIX = "openpi:"


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
        from policies.openpi_client import OpenPIClientPolicy

        policy = OpenPIClientPolicy(spec.removeprefix(OPENPI_PREFIX))
        store.register_policy_version(policy.version, kind="openpi", uri=spec.removeprefix(OPENPI_PREFIX))
        return policy
    return _load_checkpoint(checkpoint_directory(spec, store), store, task)


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
