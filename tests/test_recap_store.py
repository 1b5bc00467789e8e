"""RECAP over the experience store: episodes in, cross-fitted relabel back as new versions, conditioning after."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recap import (
    AdvantageConfig,
    RelabelConfig,
    RelabelMismatchError,
    ValueConfig,
    conditioned_episodes,
    relabel,
)
from recap.synthetic import chain_dataset
from storage import ExperienceStore, NotFoundError

torch.set_num_threads(1)

CONFIG = RelabelConfig(
    value=ValueConfig(hidden_dim=32, train_steps=40, batch_size=64), advantage=AdvantageConfig(n_step=10)
)


def relabel_round_trip(url: str) -> None:
    store = ExperienceStore(url)
    store.upgrade()
    store.register_policy_version("synthetic", kind="scripted")
    episodes = chain_dataset(seed=11, episodes_per_task=4, intervention_rate=0.03)
    for episode in episodes:
        assert store.write_episode(episode)
    loaded = list(store.iter_episodes(run_id=None))
    mine = [ep for ep in loaded if ep.uuid in {e.uuid for e in episodes}]
    assert len(mine) == len(episodes)
    first = relabel(mine, CONFIG)
    second = relabel(mine, CONFIG.model_copy(update={"fold_seed": 1}))
    first_id, second_id = store.write_relabel(first), store.write_relabel(second)
    assert first_id != second_id
    stored_first, stored_second = store.load_relabel(first_id), store.load_relabel(second_id)
    assert stored_first.version != stored_second.version  # a new version, never an overwrite
    assert stored_first.diagnostics == first.diagnostics
    assert stored_first.config["folds"] == first.config["folds"]
    assert stored_first.value_model_version == first.value_model_version
    original = {labels.episode_uuid: labels for labels in first.labels}
    for labels in stored_first.labels:
        np.testing.assert_array_equal(labels.indicators, original[labels.episode_uuid].indicators)
        np.testing.assert_allclose(labels.advantages, original[labels.episode_uuid].advantages, rtol=1e-6)
    conditioned = conditioned_episodes(mine, stored_first)
    assert sum(item.indicators.sum() for item in conditioned) > 0
    stranger = chain_dataset(seed=12, episodes_per_task=1, tasks=("chain-a",))[0]
    with pytest.raises(RelabelMismatchError, match="not in relabel"):
        conditioned_episodes([stranger], stored_first)
    with pytest.raises(NotFoundError):
        store.load_relabel("no-such-relabel")
    store.close()


def test_relabel_round_trip_through_sqlite_store(tmp_path) -> None:
    relabel_round_trip(f"sqlite:///{tmp_path / 'store.db'}")


@pytest.mark.postgres
def test_relabel_round_trip_through_postgres_store(pg_url) -> None:
    relabel_round_trip(pg_url)
