"""RECAP ablations through the store: weighted BC and retraining from the prior via ``train_vla``, and one
``recap iterate`` iteration through the shared stages, reading its episodes once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from envs import EnvConfig, EnvSettings, SimulatedHumanConfig
from experiments import stages
from experiments.collection import CollectConfig, run_collection
from experiments.recap_iteration import RecapIterationConfig, run_recap_iteration
from experiments.training import BCConfig, load_training_episodes, train_vla
from policies.vla import VLAInputError
from recap import RelabelConfig, ValueConfig
from storage import EpisodeQuery, ExperienceStore

TASK = "reach-v3"
ENV = EnvConfig(task=TASK, cameras=("corner2",), width=48, height=48, max_episode_steps=30)
BC = BCConfig(
    env=EnvSettings(cameras=("corner2",), image_size=48, max_episode_steps=30), steps=3, batch_size=8
)
SELECTION = EpisodeQuery(tasks=[TASK], run_ids=["demos"])


@pytest.fixture(scope="module")
def store_and_prior(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablations")
    url = f"sqlite:///{folder / 'ablations.db'}"
    run_collection(
        CollectConfig(env=ENV, policy="scripted", noise=0.5, episodes=3, store_url=url, run_id="demos"),
        progress=False,
    )
    store = ExperienceStore(url)
    return store, url, train_vla(store, SELECTION, BC, folder, progress=False)


def test_weighted_retraining_starts_from_the_prior(store_and_prior, tmp_path):
    store, _, prior = store_and_prior
    episodes = load_training_episodes(store, SELECTION, images=False)
    assert all(not episode.images for episode in episodes)
    weights = {e.uuid: (np.arange(e.length) < e.length // 2).astype(np.float32) for e in episodes}
    frozen = BC.model_copy(update={"learning_rate": 1e-12, "steps": 1})
    retrained = train_vla(
        store, SELECTION, frozen, tmp_path, weights=lambda e: weights[e.uuid], init_from=prior.checkpoint,
        parent_version=prior.version, progress=False,
    )  # fmt: skip
    for a, b in zip(prior.policy.model.parameters(), retrained.policy.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # a ~zero learning rate keeps the prior's weights
    np.testing.assert_array_equal(prior.policy.norm_stats.state.mean, retrained.policy.norm_stats.state.mean)
    parents = {row["version"]: row["parent"] for row in store.policy_versions()}
    assert parents[retrained.version] == prior.version


def test_bad_weights_and_mismatched_prior_fail_with_one_line(store_and_prior, tmp_path):
    store, _, prior = store_and_prior
    with pytest.raises(VLAInputError, match="every weight is 0"):
        train_vla(store, SELECTION, BC, tmp_path, weights=lambda e: np.zeros(e.length), progress=False)
    with pytest.raises(VLAInputError, match=r"weights.shape: expected"):
        train_vla(store, SELECTION, BC, tmp_path, weights=lambda e: np.ones(e.length + 1), progress=False)
    bigger = BC.model_copy(update={"env": BC.env.model_copy(update={"image_size": 64})})
    with pytest.raises(ValueError, match=r"init_from .* image_size"):
        train_vla(store, SELECTION, bigger, tmp_path, init_from=prior.checkpoint, progress=False)


def test_recap_iterate_runs_the_shared_stages_reading_each_episode_once(
    store_and_prior, tmp_path, monkeypatch
):
    """``run_recap_iteration`` (``flywheel recap iterate``) is collect → relabel → train → evaluate → gate of
    ``experiments.stages``, and the iteration's episodes are read from the store once, for relabel and train
    (with images: π reads a camera; a state-input value model reuses them)."""
    _, url, prior = store_and_prior
    called: list[str] = []
    for name in ("collect", "relabel", "train", "evaluate", "gate"):
        monkeypatch.setattr(stages, name, _recording(getattr(stages, name), name, called))
    reads: list[tuple[str, bool]] = []
    load_episode = ExperienceStore.load_episode

    def counting(store, episode_uuid, images=True):
        reads.append((str(episode_uuid), images))
        return load_episode(store, episode_uuid, images)

    monkeypatch.setattr(ExperienceStore, "load_episode", counting)
    config = RecapIterationConfig(
        task=TASK, policy=str(prior.checkpoint), store_url=url, collect_episodes=1,
        human=SimulatedHumanConfig(no_progress_steps=5, takeover_steps=5),
        relabel=RelabelConfig(value=ValueConfig(train_steps=5, hidden_dim=16)), bc=BC, eval_episodes=1,
    )  # fmt: skip
    result = run_recap_iteration(config, tmp_path, progress=False)
    assert called == ["collect", "relabel", "train", "evaluate", "gate"]
    assert (
        len(reads) == 4 and len(set(reads)) == 4 and all(images for _, images in reads)
    )  # 3 demos + 1 rollout
    assert result.trained.episodes_used == 4 and len(result.relabel.labels) == 4
    assert result.gate is not None and result.after.policy_version == result.trained.version


def _recording(function, name: str, called: list[str]):
    def recorded(*args, **kwargs):
        called.append(name)
        return function(*args, **kwargs)

    return recorded


def test_iteration_env_comes_from_the_retraining_env_settings() -> None:
    """One env settings model: the iteration's env is ``bc.env`` for the task; settings that do not fit the
    task are refused when the config is built."""
    config = RecapIterationConfig(task=TASK, policy="scripted", store_url="sqlite://", bc=BC)
    assert (config.task_env.task, config.task_env.max_episode_steps, config.task_env.width) == (TASK, 30, 48)
    wrong = BC.model_copy(update={"env": EnvSettings(success_key="is_success")})
    with pytest.raises(ValidationError, match="success_key: applies to gymnasium envs"):
        RecapIterationConfig(task=TASK, policy="scripted", store_url="sqlite://", bc=wrong)
