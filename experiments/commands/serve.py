"""``flywheel serve``: serve a policy over openpi's WebSocket protocol (see docs/serving.md).

``--policy`` is a VLA checkpoint directory, ``scripted:<task>`` (Meta-World's scripted expert; simulation
only, it reads the simulator state the client sends), or a version registered in the experience store given
with ``--store`` (its ``uri`` must be a checkpoint directory or ``scripted:<task>``); ``@FILE`` reads one of
those from FILE. An RLT checkpoint directory or ``rlt`` version (its prior + the RLT actor, loaded by
``experiments.policy_loader``) needs ``--store``. SIGHUP resolves ``--policy`` again (re-reading FILE) and
hot-swaps to the result without dropping connections, so ``echo v7 > current; kill -HUP <pid>`` deploys v7.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from policies.base import Policy
from policies.device import place, resolve_device
from policies.serving import ObservationKeys, PolicyServer, ServerConfig

app = typer.Typer(help="Serve a policy over openpi's WebSocket protocol.")

SCRIPTED_PREFIX = "scripted:"
KEY_HELP = (
    "openpi-style field name, repeatable: image:<camera>=<wire key>, state=<wire key>, prompt=<wire key> "
    "(e.g. --key image:corner=observation/image --key state=observation/state)."
)


class PolicyResolutionError(ValueError):
    """``--policy`` names nothing that can be loaded."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``flywheel serve`` needs (the CLI only parses into this)."""

    policy: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    max_batch: int = 16
    max_wait_ms: float = 5.0
    store: str | None = None
    send_embeddings: bool = False
    allow_privileged: bool = False
    keys: tuple[str, ...] = ()
    debug: bool = False
    device: str = "auto"


def resolve_policy(spec: str, store_url: str | None = None) -> Policy:
    """Load what ``spec`` names: ``scripted:<task>``, a checkpoint directory, a registered version, or
    ``@FILE`` holding one of those."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise PolicyResolutionError(f"--policy {spec!r}: {path} is not a file")
        return resolve_policy(path.read_text().strip(), store_url)
    if spec.startswith(SCRIPTED_PREFIX):
        from policies.scripted import ScriptedPolicy

        task = spec.removeprefix(SCRIPTED_PREFIX)
        return ScriptedPolicy(task, version=spec)
    if Path(spec).is_dir():
        from policies.checkpoint import load_checkpoint

        if (Path(spec) / "rlt.json").is_file():
            return _resolve_rlt(Path(spec), store_url)

        return load_checkpoint(spec)
    if store_url is None:
        raise PolicyResolutionError(
            f"--policy {spec!r}: not a directory nor scripted:<task>; "
            "pass --store to look up a registered version"
        )
    return _resolve_registered(spec, store_url)


def _resolve_registered(version: str, store_url: str) -> Policy:
    from storage import ExperienceStore

    registered = {row["version"]: row for row in ExperienceStore(store_url).policy_versions()}
    if version not in registered:
        raise PolicyResolutionError(f"--policy {version!r}: no such version registered in {store_url}")
    uri = registered[version]["uri"]
    if uri is None:
        raise PolicyResolutionError(f"--policy {version!r}: the registered version has no uri to load from")
    if uri.startswith(SCRIPTED_PREFIX):
        from policies.scripted import ScriptedPolicy

        return ScriptedPolicy(uri.removeprefix(SCRIPTED_PREFIX), version=version)
    if not Path(uri).is_dir():
        raise PolicyResolutionError(f"--policy {version!r}: uri {uri!r} is not a checkpoint directory here")
    if registered[version]["kind"] == "rlt":
        return _resolve_rlt(Path(uri), store_url)
    from policies.checkpoint import load_checkpoint

    return load_checkpoint(uri, version=version)


def _resolve_rlt(directory: Path, store_url: str | None) -> Policy:
    """An RLT checkpoint (prior + RLT actor); the store holds its prior and gets its version registered."""
    from experiments.policy_loader import load_rlt
    from storage import ExperienceStore

    if store_url is None:
        raise PolicyResolutionError(
            f"--policy {directory}: an RLT checkpoint needs --store (it holds its prior)"
        )
    return load_rlt(directory, ExperienceStore(store_url))


def _reads_privileged(policy: Policy) -> bool:
    """Scripted experts, and RLT policies whose prior, embeddings or hand-off read the simulator state."""
    from experiments.pipeline_rlt import RLTDeployedPolicy
    from policies.scripted import ScriptedPolicy
    from rlt.phase import DistanceSwitch
    from rlt.state import EmbeddingPrior

    if isinstance(policy, RLTDeployedPolicy):
        return isinstance(policy.switch, DistanceSwitch) or _reads_privileged(policy.prior)
    if isinstance(policy, EmbeddingPrior):
        return getattr(policy.embedder, "key", None) == "privileged" or _reads_privileged(policy.policy)
    return isinstance(policy, ScriptedPolicy)


def build_server(config: ServeConfig) -> PolicyServer:
    """Resolve the policy and the API key, and build the (not yet started) server."""
    api_key = None
    if config.api_key_env is not None:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise PolicyResolutionError(f"--api-key-env: environment variable {config.api_key_env} is unset")
    policy = place(resolve_policy(config.policy, config.store), resolve_device(config.device))
    server_config = ServerConfig(
        host=config.host,
        port=config.port,
        api_key=api_key,
        max_message_bytes=config.max_message_bytes,
        max_batch=config.max_batch,
        max_wait_ms=config.max_wait_ms,
        debug=config.debug,
        send_embeddings=config.send_embeddings,
        allow_privileged=config.allow_privileged or _reads_privileged(policy),
        keys=ObservationKeys.parse(config.keys) if config.keys else None,
    )
    return PolicyServer(policy, server_config)


def main(config: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP re-resolves ``--policy`` and hot-swaps."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = build_server(config)
    except ValueError as error:  # unloadable policy, bad settings: one line, exit code 2
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    if server.config.host not in ("127.0.0.1", "localhost", "::1") and server.config.api_key is None:
        logging.warning(
            "serving on %s without an API key: anyone reaching it can query the policy", config.host
        )
    device = resolve_device(config.device)
    server.serve_forever(reload=lambda: place(resolve_policy(config.policy, config.store), device))


@app.command(name="serve")
def serve(
    policy: str = typer.Option(
        ..., help="Checkpoint directory, scripted:<task>, a registered version, or @FILE naming one."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, help="TCP port (0 picks a free one)."),
    api_key_env: str | None = typer.Option(
        None, help="Environment variable holding the API key clients send."
    ),
    max_message_bytes: int = typer.Option(16 * 1024 * 1024, help="Largest accepted frame, in bytes."),
    max_batch: int = typer.Option(16, help="Most observations batched into one inference."),
    max_wait_ms: float = typer.Option(5.0, help="Longest wait for more requests before inferring a batch."),
    store: str | None = typer.Option(None, help="Experience store URL to look registered versions up in."),
    send_embeddings: bool = typer.Option(False, help="Add backbone embeddings to every reply (for RLT)."),
    allow_privileged: bool = typer.Option(
        False, help="Accept simulator state from clients (simulation only; implied by scripted:<task>)."
    ),
    key: Annotated[list[str] | None, typer.Option(help=KEY_HELP)] = None,
    debug: bool = typer.Option(False, help="Send tracebacks to clients in error frames (development only)."),
    device: str = typer.Option(
        "auto", help="Where the model runs: cpu, cuda, mps or auto (the accelerator if any)."
    ),
) -> None:
    """Serve a policy over openpi's WebSocket protocol (metadata frame, lock-step msgpack-numpy, /healthz)."""
    config = ServeConfig(
        policy=policy,
        host=host,
        port=port,
        api_key_env=api_key_env,
        max_message_bytes=max_message_bytes,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        store=store,
        send_embeddings=send_embeddings,
        allow_privileged=allow_privileged,
        keys=tuple(key or ()),
        debug=debug,
        device=device,
    )
    main(config)
