"""Data-parallel training of the learners on Ray Train (``TorchTrainer``, DDP: gloo on CPU, NCCL on GPU).

The driver fits what must be identical everywhere (tokenizers, normalization statistics, the initial weights)
and writes it as a checkpoint; each of the N workers loads it, reads *its shard* of the episode ids from the store
(``ids[rank::N]``; with workers on several nodes the store must be PostgreSQL) and runs the same training loop
as a single process (:func:`policies.training.train_bc`), which under ``torch.distributed`` takes
``batch_size / N`` samples per step and lets DDP average the gradients: the global batch and the learning rate
are the single-process ones, so the result does not depend on N. Rank 0 writes the resumable training state
(the single-process format, :mod:`policies.train_state`) and the final weights; the driver registers them.
A worker that dies is restarted by Ray Train (``FailureConfig``) and resumes from the last training state.

The value model (:func:`train_value_data_parallel`) trains the same way: DDP over ranks, ``batch_size / N``
samples per worker from its shard of episodes, rank 0 saves.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from policies.checkpoint import load_checkpoint, save_checkpoint
from policies.training import EpisodeArrays, TrainConfig, TrainResult, build_dataset, train_bc
from policies.vla.policy import VLAPolicy
from recap import ValueConfig
from recap.value import ValueModel, train_value
from storage import EpisodeRecord

#: How often Ray Train restarts a failed worker group before the training fails.
MAX_FAILURES = 2
INIT, FINAL, HISTORY = "init", "final", "history.json"


def train_bc_data_parallel(
    store_url: str,
    records: list[EpisodeRecord],
    arrays: list[EpisodeArrays],
    policy: VLAPolicy,
    config: TrainConfig,
    workers: int,
    output_dir: Path,
) -> TrainResult:
    """Train ``policy`` in place on ``workers`` Ray Train workers; returns rank 0's record (mean loss over ranks).

    ``records`` name the episodes; ``arrays`` are their training arrays without images (states, actions, prompt,
    per-step conditions and weights, computed once here). Both are sharded over the workers, each of which reads
    the images of its shard from the store at ``store_url``.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ray-train-", dir=output_dir))
    try:
        save_checkpoint(policy, work / INIT)
        episodes = [
            (str(record.uuid), episode)
            for record, episode in zip([r for r in records if r.length > 0], arrays, strict=True)
        ]
        use_gpu = config.device.startswith("cuda")
        loop_config = {
            "store_url": store_url,
            "episodes": episodes,
            "train": asdict(config) | {"state_dir": str(config.state_dir) if config.state_dir else None},
            "work": str(work),
            "inference": {"conditions": policy.conditions, "cfg_beta": policy.cfg_beta},
        }
        _fit(_bc_worker, loop_config, workers, use_gpu, work)
        trained = load_checkpoint(work / FINAL)
        policy.model.load_state_dict(trained.model.state_dict())
        record = json.loads((work / HISTORY).read_text())
        return TrainResult(**record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_value_data_parallel(
    store_url: str,
    episodes: Sequence[EpisodeRecord],
    config: ValueConfig,
    horizons: dict[str, int] | None,
    workers: int | None = None,
) -> ValueModel:
    """:func:`recap.value.train_value` on ``workers`` (default ``config.train_workers``) Ray Train workers.

    Every worker reads the episodes from the store (states, and images when the model has a camera): the
    normalization statistics and the held-out split are global, while each worker draws its minibatches
    from the steps of its own shard of episodes. Rank 0 saves the model; it is returned loaded on the CPU.
    """
    workers = workers or config.train_workers
    work = Path(tempfile.mkdtemp(prefix="ray-train-value-"))
    try:
        loop_config = {
            "store_url": store_url,
            "episodes": [str(episode.uuid) for episode in episodes],
            "images": config.camera is not None,
            "config": config.model_dump(mode="json"),
            "horizons": horizons,
            "work": str(work),
        }
        _fit(_value_worker, loop_config, workers, config.device.startswith("cuda"), work)
        return ValueModel.load(work / "value")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fit(loop, loop_config: dict[str, Any], workers: int, use_gpu: bool, work: Path) -> None:
    """Run ``loop`` on ``workers`` DDP workers (gloo on CPU, NCCL on GPU); a failed worker group is restarted
    up to ``MAX_FAILURES`` times (the loops resume from their training state)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.cluster import ensure_ray

    ensure_ray()
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"{loop.__name__.strip('_')}-{uuid.uuid4().hex[:8]}",
            storage_path=str(work / "ray"),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    outcome = trainer.fit()
    if outcome.error is not None:
        raise RuntimeError(f"data-parallel training failed: {outcome.error}") from outcome.error


def _value_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of :func:`train_value_data_parallel`."""
    import ray.train
    import ray.train.torch

    from storage import ExperienceStore

    context = ray.train.get_context()
    config = ValueConfig.model_validate(loop_config["config"])
    device = ray.train.torch.get_device() if config.device.startswith("cuda") else "cpu"
    config = config.model_copy(update={"device": "cuda" if str(device).startswith("cuda") else "cpu"})
    store = ExperienceStore(loop_config["store_url"])
    episodes = [store.load_episode(e, images=loop_config["images"]) for e in loop_config["episodes"]]
    model = train_value(episodes, config, loop_config["horizons"])
    if context.get_world_rank() == 0:
        model.save(Path(loop_config["work"]) / "value")
    ray.train.report({"loss": model.training_loss if model.training_loss is not None else float("nan")})


def _bc_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: load the shared start, read this rank's episodes, train, rank 0 saves."""
    import ray.train
    import ray.train.torch

    from storage import ExperienceStore

    context = ray.train.get_context()
    rank, size = context.get_world_rank(), context.get_world_size()
    settings = loop_config["train"]
    device = ray.train.torch.get_device() if settings["device"].startswith("cuda") else "cpu"
    state_dir = settings["state_dir"]
    config = replace(
        TrainConfig(**{**settings, "state_dir": None}),
        device=str(device),
        state_dir=Path(state_dir) if state_dir else None,
        progress=settings["progress"] and rank == 0,
    )
    work = Path(loop_config["work"])
    policy = load_checkpoint(work / INIT, **loop_config["inference"])
    store = ExperienceStore(loop_config["store_url"])
    arrays = [
        replace(episode, images=store.load_episode(episode_uuid).images)
        for episode_uuid, episode in loop_config["episodes"][rank::size]
    ]
    dataset = build_dataset(arrays, policy.config.action_horizon)
    result = train_bc(policy, dataset, config)
    if rank == 0:
        save_checkpoint(policy, work / FINAL)
        record = {
            name: getattr(result, name) for name in ("history", "evaluations", "resumed_from", "device")
        }
        (work / HISTORY).write_text(json.dumps(record))
    ray.train.report({"loss": result.history[-1]["loss"] if result.history else float("nan")})
