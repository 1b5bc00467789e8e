"""A flywheel policy as an MLflow pyfunc model, in MLflow's "models from code" form: ``experiments.tracking``
logs a checkpoint with this file as the ``python_model`` and MLflow runs it when the model is loaded
(``mlflow.pyfunc.load_model("models:/<name>@deployed")``); flywheel must be installed there.

``predict`` takes a dict of arrays: ``state`` (B×S float32), ``prompt`` (B strings) and ``images/<camera>``
(B×H×W×3 uint8) for each camera the policy declares (the logged signature); it returns the action chunk
(B×H×D float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from experiments.mlflow_policy import CHECKPOINT_ARTIFACT, IMAGE_INPUT


class PolicyModel(PythonModel):
    """The checkpoint artifact, loaded by flywheel's one policy loader."""

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact."""
        from experiments.policy_loader import load

        self.policy = load(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input, params=None):  # no hints: the logged signature is the schema
        """The action chunk for a batch of observations (a dict of arrays, see the module doc)."""
        from policies.base import ObservationBatch

        batch = ObservationBatch(
            images={
                key.removeprefix(IMAGE_INPUT): np.asarray(value, dtype=np.uint8)
                for key, value in model_input.items()
                if key.startswith(IMAGE_INPUT)
            },
            state=np.asarray(model_input["state"], dtype=np.float32),
            prompt=[str(prompt) for prompt in np.asarray(model_input["prompt"]).reshape(-1)],
        )
        return self.policy.infer(batch).actions


set_model(PolicyModel())
