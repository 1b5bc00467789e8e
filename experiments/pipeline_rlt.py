"""The pipeline's RLT stage: online RLT (``rlt.online.OnlineRLT``) around a prior, saved as its own policy kind.

An RLT result is not a VLA checkpoint: it is the frozen prior plus an RL token and a chunked actor that take
over in the critical phase. It is saved as an ``rlt.checkpoint`` directory (written atomically; its manifest
holds the prior, the settings and the RL history) and registered in the store as kind ``rlt`` with the prior
as its parent;
``load_rlt_policy`` rebuilds it as a ``Policy`` (``RLTDeployedPolicy``) for evaluation, collection and the next
iteration.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs import EnvConfig, make_env
from experiments.pipeline_config import RLTSettings
from policies.base import ActionChunk, Observation, ObservationBatch, Policy
from policies.device import resolve_device
from policies.manifest import RLT_KIND
from rlt.checkpoint import MANIFEST_FILE, load_rlt_checkpoint, save_rlt_checkpoint
from rlt.deployment import PriorSpec, RLTDeployment
from rlt.online import EvalPoint, OnlineConfig, OnlineRLT
from rlt.phase import PhaseSwitch
from rlt.rl_token import RLToken
from rlt.state import RLStateEncoder, token_config_for
from rlt.td3 import ChunkedTD3, LearnerConfig
from storage import EpisodeRecord, ExperienceStore


@dataclass(frozen=True)
class RLTResult:
    """What an RLT stage produced: the saved policy, its RL curve and per-episode statistics."""

    version: str
    checkpoint: Path
    curve: list[EvalPoint]
    episode_stats: list[dict[str, Any]]


def deployment_for(task: str, prior: PriorSpec, settings: RLTSettings) -> RLTDeployment:
    """The deployment block the stage's checkpoint carries: the prior and the settings' hand-off."""
    return RLTDeployment(task, prior, settings.handoff, settings.handoff_distance)


def run_rlt(
    store: ExperienceStore,
    prior: PriorSpec,
    load_version: Callable[[str], Policy],
    env: EnvConfig,
    settings: RLTSettings,
    *,
    version: str,
    run_id: str,
    folder: Path,
    seed: int,
    records: Iterable[EpisodeRecord] = (),
) -> RLTResult:
    """Run online RLT around ``prior`` on ``env``; store every episode under ``run_id``; save to ``folder``.

    ``records`` (stored episodes of the task, e.g. this iteration's collection with its interventions) join
    the warm-up: they help fit the RL token and seed the replay buffer.
    ``version`` is registered (kind ``rlt``, parent = the prior) before the first episode, because the
    episodes' steps name it. Episode ids are derived from ``run_id`` and the episode's index, so a rerun after
    a kill skips the ids the killed attempt stored instead of adding episodes. The checkpoint
    (``rlt.checkpoint.save_rlt_checkpoint``, renamed into place when complete) marks a finished stage.
    """
    torch.manual_seed(seed)
    policy = prior.load(env.task, settings.chunk_size, load_version)
    deployment = deployment_for(env.task, prior, settings)
    switch = deployment.switch()
    environment = make_env(env)
    observation, _ = environment.reset(seed=seed)
    token = RLToken(token_config_for(policy, observation, z_dim=settings.z_dim))
    manifest = _manifest(settings, token)
    store.register_policy_version(
        version,
        kind=RLT_KIND,
        uri=str(folder.resolve()),
        parent=prior.version,
        metadata=manifest | deployment.to_manifest(),
    )
    store.register_run(run_id, name="rlt", config={"prior": prior.version, "version": version})
    loop = OnlineRLT(
        environment,
        policy,
        switch,
        token,
        OnlineConfig(
            task=env.task,
            env_id=f"metaworld/{env.task}",
            warmup_episodes=settings.warmup_episodes,
            total_env_steps=settings.env_steps,
            exploration_noise=settings.exploration_noise,
            token_steps=settings.token_steps,
            token_batch_size=min(128, settings.batch_size),
            eval_every_steps=settings.eval_every_steps,
            eval_episodes=settings.eval_episodes,
            record_images=settings.record_images,
            rl_version=version,
            seed=seed,
        ),
        learner_config(settings, seed),
    )
    loop.on_episode = episode_writer(store, run_id, lambda: loop.episode_index)
    state_path = folder.parent / f"{folder.name}-state.pt"  # a killed stage continues from here
    curve = loop.run(records, state_path=state_path)
    environment.close()
    stats = [dataclasses.asdict(s) for s in loop.stats]
    history = {"curve": [dataclasses.asdict(point) for point in curve], "episodes": stats}
    history = json.loads(json.dumps(history, default=lambda value: value.item()))
    manifest |= {"rl_version": version, "history": history}
    save_rlt_checkpoint(folder, loop.learner, loop.token, deployment, manifest)
    state_path.unlink(missing_ok=True)
    return RLTResult(version, folder, curve, stats)


def load_rlt_result(folder: Path, version: str) -> RLTResult:
    """The result of a finished RLT stage, read back from its folder (a rerun after a kill that came after
    the save logs the same curve instead of training again)."""
    history = json.loads((folder / MANIFEST_FILE).read_text())["history"]
    curve = [EvalPoint(**point) for point in history["curve"]]
    return RLTResult(version, folder, curve, history["episodes"])


def learner_config(settings: RLTSettings, seed: int) -> LearnerConfig:
    """The chunked actor-critic's settings."""
    return LearnerConfig(
        chunk_size=settings.chunk_size,
        beta=settings.beta,
        utd_ratio=settings.utd_ratio,
        net_arch=tuple(settings.net_arch),
        batch_size=settings.batch_size,
        learning_starts=settings.learning_starts,
        normalize_state=settings.normalize_state,
        seed=seed,
        device=str(resolve_device(settings.device)),
    )


def _manifest(settings: RLTSettings, token: RLToken) -> dict[str, Any]:
    return {"settings": settings.model_dump(mode="json"), "token": dataclasses.asdict(token.config)}


def episode_writer(
    store: ExperienceStore, run_id: str, index: Callable[[], int]
) -> Callable[[EpisodeRecord], None]:
    """Commit each episode under ``run_id`` with an id derived from the run and the loop's episode ``index()``
    (which a resumed loop continues); ids an earlier, killed attempt of the stage already wrote are skipped."""
    stored = {summary.uuid for summary in store.list_episodes(run_id=run_id)}

    def write(record: EpisodeRecord) -> None:
        episode_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{run_id}#{index()}")
        if episode_id not in stored:
            store.write_episode(dataclasses.replace(record, uuid=episode_id, run_id=run_id))

    return write


def load_rlt_policy(
    folder: Path, version: str, task: str, load_version: Callable[[str], Policy]
) -> RLTDeployedPolicy:
    """Rebuild a saved RLT policy (a pipeline's or ``flywheel rlt``'s) from its deployment block; its prior is
    loaded with ``load_version`` or rebuilt as a scripted expert."""
    checkpoint = load_rlt_checkpoint(folder)
    deployment = checkpoint.deployment
    prior = deployment.prior.load(task, checkpoint.learner.config.chunk_size, load_version)
    return RLTDeployedPolicy(prior, checkpoint.token, checkpoint.learner, deployment.switch(), version)


class RLTDeployedPolicy:
    """The prior until the hand-off, then the deterministic RLT actor on ``(z_rl, proprio)`` and the prior's
    chunk — the learner's ``eval`` mode of ``OnlineRLT`` as a batched ``Policy``.

    The hand-off latches per batch row until ``reset`` (called at every episode start by the rollout worker);
    with one env per worker that is exactly the training loop's per-episode latch.
    """

    def __init__(
        self, prior: Policy, token: RLToken, learner: ChunkedTD3, switch: PhaseSwitch, version: str
    ) -> None:
        self.prior, self.learner, self.switch = prior, learner, switch
        self.encoder = RLStateEncoder(token, learner.state_dim - token.config.z_dim)
        self.version = version
        self.action_horizon = learner.config.chunk_size
        self.action_dim = prior.action_dim
        self._critical: dict[int, bool] = {}

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        proposal = self.prior.infer(batch)
        actions = np.asarray(proposal.actions[:, : self.action_horizon], np.float32).copy()
        rows = [row for row in range(len(actions)) if self._is_critical(row, batch)]
        if rows:
            states = self.encoder.encode(
                np.asarray(proposal.embeddings, np.float32)[rows], np.asarray(batch["state"])[rows]
            )
            actions[rows] = np.clip(self.learner.act(states, actions[rows]), -1.0, 1.0)
        return ActionChunk(actions=actions, embeddings=proposal.embeddings, timing=proposal.timing)

    def reset(self) -> None:
        self.prior.reset()
        self.switch.reset()
        self._critical.clear()

    def _is_critical(self, row: int, batch: ObservationBatch) -> bool:
        if not self._critical.get(row, False):
            observation = Observation(**{key: value[row] for key, value in batch.items() if key != "images"})
            self._critical[row] = self.switch.is_critical(observation, {})
        return self._critical[row]
