"""``flywheel serve``: serve a policy over openpi's WebSocket protocol (see docs/serving.md).

``--policy`` is anything ``experiments.policy_loader`` loads: a checkpoint directory (VLA, hierarchical or RLT —
its ``policy.json`` says which), ``scripted[:<task>]`` (Meta-World's scripted expert; simulation only, it reads
the simulator state the client sends), ``openpi:ws://…``, a version registered in the experience store given
with ``--db``, or ``@FILE`` naming one of those (a pipeline's deploy file). An RLT policy whose prior is a
stored version needs ``--db`` too. SIGHUP resolves ``--policy`` again (re-reading FILE) and hot-swaps to the
result without dropping connections, so ``echo v7 > current; kill -HUP <pid>`` deploys v7.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from experiments.paths import default_store_url
from experiments.validation import UserError

if TYPE_CHECKING:
    from policies.base import Policy
    from policies.serving import PolicyServer

app = typer.Typer(help="Serve a policy over openpi's WebSocket protocol.")

KEY_HELP = (
    "openpi-style field name, repeatable: image:<camera>=<wire key>, state=<wire key>, prompt=<wire key> "
    "(e.g. --key image:corner=observation/image --key state=observation/state)."
)


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


def _loader(spec: str, store_url: str | None = None) -> Callable[[], Policy]:
    """What loads ``spec`` (``experiments.policy_loader.load``: a checkpoint directory of any kind,
    ``scripted[:<task>]``, ``openpi:…``, a version registered in the store at ``store_url``, or ``@FILE``),
    once now and again at every SIGHUP; the store is opened once."""
    from experiments.policy_loader import load

    store = None
    if store_url is not None:
        from storage import ExperienceStore

        store = ExperienceStore(store_url)
    return lambda: load(spec, store=store)


def _reads_privileged(policy: Policy) -> bool:
    """Scripted experts, and RLT policies whose prior, embeddings or hand-off read the simulator state."""
    from envs.scripted import ScriptedPolicy
    from rlt.actor import RLTActor
    from rlt.phase import DistanceSwitch
    from rlt.state import EmbeddingPrior

    if isinstance(policy, RLTActor):
        return isinstance(policy.switch, DistanceSwitch) or _reads_privileged(policy.prior)
    if isinstance(policy, EmbeddingPrior):
        return getattr(policy.embedder, "key", None) == "privileged" or _reads_privileged(policy.policy)
    return isinstance(policy, ScriptedPolicy)


def build_server(config: ServeConfig, load_policy: Callable[[], Policy] | None = None) -> PolicyServer:
    """Load the policy (with ``load_policy``; default: ``--policy`` through the loader), resolve the API key,
    and build the (not yet started) server."""
    from policies.device import place, resolve_device
    from policies.serving import ObservationKeys, PolicyServer, ServerConfig

    load_policy = load_policy or _loader(config.policy, config.store)
    api_key = None
    if config.api_key_env is not None:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env: environment variable {config.api_key_env} is unset")
    policy = place(load_policy(), resolve_device(config.device))
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
    from policies.device import place, resolve_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        load_policy = _loader(config.policy, config.store)
        server = build_server(config, load_policy)
    except ValueError as error:  # unloadable policy, bad settings: one line, exit code 2
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    if server.config.host not in ("127.0.0.1", "localhost", "::1") and server.config.api_key is None:
        logging.warning(
            "serving on %s without an API key: anyone reaching it can query the policy", config.host
        )
    device = resolve_device(config.device)
    server.serve_forever(reload=lambda: place(load_policy(), device))


@app.command(name="serve")
def serve(
    policy: str = typer.Option(
        ...,
        help="Checkpoint directory (VLA, hierarchical, RLT), scripted:<task>, openpi:ws://…, a registered version, "
        "or @FILE naming one.",
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, help="TCP port (0 picks a free one)."),
    api_key_env: str | None = typer.Option(
        None, help="Environment variable holding the API key clients send."
    ),
    max_message_bytes: int = typer.Option(16 * 1024 * 1024, help="Largest accepted frame, in bytes."),
    max_batch: int = typer.Option(16, help="Most observations batched into one inference."),
    max_wait_ms: float = typer.Option(5.0, help="Longest wait for more requests before inferring a batch."),
    store: str | None = typer.Option(
        None,
        "--db",
        help="Experience store URL to look registered versions up in (default: the embedded SQLite store).",
    ),
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
        store=store if store is not None else default_store_url(),
        send_embeddings=send_embeddings,
        allow_privileged=allow_privileged,
        keys=tuple(key or ()),
        debug=debug,
        device=device,
    )
    main(config)
