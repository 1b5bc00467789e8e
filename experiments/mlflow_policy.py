"""A flywheel policy in MLflow's model registry: the artifact layout of the pyfunc model ``experiments.tracking``
logs (``experiments.policy_model``), and fetching a ``models:/`` policy's checkpoint for the policy loader.

Imports MLflow only when it downloads, so the loader can name ``models:/`` specs without it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from experiments.paths import default_mlflow_uri, flywheel_home

MODEL_ARTIFACT = "policy_model"
CHECKPOINT_ARTIFACT = "checkpoint"
MODELS_PREFIX = "models:/"
IMAGE_INPUT = "images/"


def download_policy(spec: str) -> Path:
    """The local checkpoint directory of ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` in the
    configured tracking store (downloaded once into ``$FLYWHEEL_HOME/models/<name>/<version>``).

    Raises ``LookupError`` (one line) for a model, alias or version that is not there."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    uri = default_mlflow_uri()
    client = MlflowClient(uri, registry_uri=uri)
    reference = spec.removeprefix(MODELS_PREFIX)
    name, alias_sep, alias = reference.partition("@")
    if not alias_sep and "/" not in reference:
        raise LookupError(f"policy {spec!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    try:
        if alias_sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = reference.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as error:
        raise LookupError(f"policy {spec!r}: {error.message} (tracking store {uri})") from None
    if Path(version.source).is_dir():  # registered by path (an RLT checkpoint, or before models were logged)
        return Path(version.source)
    target = flywheel_home() / "models" / name / str(version.version)
    if not (target / "MLmodel").is_file():
        _download(f"{MODELS_PREFIX}{name}/{version.version}", target, uri)
    artifacts = Model.load(str(target / "MLmodel")).flavors["python_function"].get("artifacts", {})
    if CHECKPOINT_ARTIFACT not in artifacts:
        raise LookupError(f"policy {spec!r}: version {version.version} of {name!r} holds no flywheel policy")
    return target / artifacts[CHECKPOINT_ARTIFACT]["path"]


def _download(model_uri: str, target: Path, uri: str) -> None:
    """Download a model version's files into ``target`` (via a sibling folder renamed into place)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        mlflow.artifacts.download_artifacts(
            model_uri, dst_path=str(partial), tracking_uri=uri, registry_uri=uri
        )
    except MlflowException as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise LookupError(f"policy {model_uri!r}: {error.message}") from None
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
