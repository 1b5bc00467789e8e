"""Turn a policy spec from a config or the command line into a ``Policy`` — and record it in the store.

Specs: ``scripted`` (Meta-World's expert, ``noise`` sets its quality), a checkpoint directory of the built-in
VLA or of a hierarchical policy (``policies.hierarchical``), a policy version registered in the store
(resolved to its checkpoint), or ``openpi:ws://host:port`` for any openpi-compatible server.
"""

from __future__ import annotations

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
    directory = Path(spec)
    if not directory.is_dir():
        directory = _checkpoint_of_version(spec, store)
    return _load_checkpoint(directory, store)


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


def _load_checkpoint(directory: Path, store: ExperienceStore) -> Policy:
    from policies.checkpoint import load_checkpoint
    from policies.hierarchical import is_hierarchical_checkpoint, load_hierarchical

    if is_hierarchical_checkpoint(directory):
        policy = load_hierarchical(directory)
        store.register_policy_version(policy.version, kind="hierarchical", uri=str(directory.resolve()))
        return policy
    policy = load_checkpoint(directory)
    store.register_policy_version(policy.version, kind="vla", uri=str(directory.resolve()))
    return policy
