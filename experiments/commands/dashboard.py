"""``flywheel dashboard``: the MLflow UI over the pipeline's tracking store (loopback by default)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from experiments.paths import default_mlflow_uri

app = typer.Typer()


def dashboard_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line serving ``tracking_uri`` (and its local artifacts)."""
    from experiments.tracking import artifact_root_for

    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    artifact_root = artifact_root_for(tracking_uri)
    if artifact_root is not None:
        command += ["--default-artifact-root", artifact_root]
    return command


@app.command(name="dashboard")
def dashboard(
    config: Annotated[str | None, typer.Option(help="Pipeline config whose MLflow store to show")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: the config's, else the embedded store)")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind (0.0.0.0 exposes it to the network)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 5000,
) -> None:
    """Start the MLflow UI: iteration runs, stage runs, metrics, plots, videos and the model registry."""
    from experiments.pipeline_config import PipelineConfigError, load_pipeline_config

    uri = tracking_uri
    if uri is None and config is not None:
        try:
            uri = load_pipeline_config(config).resolved().mlflow_uri
        except PipelineConfigError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from error
    uri = uri or default_mlflow_uri()
    if uri.startswith(("http://", "https://")):
        typer.echo(f"error: --tracking-uri {uri} is already a server: open it in a browser", err=True)
        raise typer.Exit(code=2)
    typer.echo(f"MLflow UI on http://{host}:{port} (tracking store {uri}); Ctrl-C stops it", err=True)
    command = dashboard_command(uri, host, port)
    os.execv(command[0], command)
