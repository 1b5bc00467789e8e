"""RECAP relabeling: cross-fitting, diagnostics, sanity floor, bad input, conditioning, selectors, plots."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from recap import (
    AdvantageConfig,
    RecapInputError,
    RelabelConfig,
    RelabelMismatchError,
    SanityFloor,
    ValueConfig,
    advantage_filtered_weights,
    advantage_prompt,
    awr_weights,
    bc_all_weights,
    conditioned_episodes,
    cross_fit,
    filtered_bc_weights,
    relabel,
    relabel_with_model,
    train_value,
)
from recap.plots import plot_advantage_histograms, plot_episode_values
from recap.synthetic import chain_dataset, make_episode
from storage.records import EpisodeLabels, Outcome, StepSource

torch.set_num_threads(1)

CONFIG = RelabelConfig(
    value=ValueConfig(hidden_dim=64, train_steps=300, batch_size=128),
    advantage=AdvantageConfig(n_step=10),
)


@pytest.fixture(scope="module")
def episodes():
    return chain_dataset(seed=0, episodes_per_task=30, intervention_rate=0.02, p_forward_range=(0.45, 0.9))


@pytest.fixture(scope="module")
def result(episodes):
    return cross_fit(episodes, CONFIG.model_copy(update={"k_folds": 3}))


def test_cross_fitting_never_relabels_an_episode_with_a_model_trained_on_it(episodes, result) -> None:
    everyone = {episode.uuid for episode in episodes}
    assert len(result.folds) == 3
    heldout_sets = [fold.heldout_uuids for fold in result.folds]
    assert set().union(*heldout_sets) == everyone
    assert sum(len(heldout) for heldout in heldout_sets) == len(everyone)
    labels = {label.episode_uuid: label for label in result.record.labels}
    by_uuid = {episode.uuid: episode for episode in episodes}
    for fold in result.folds:
        assert fold.model.training_uuids.isdisjoint(fold.heldout_uuids)
        assert fold.model.training_uuids == everyone - fold.heldout_uuids
        assert {result.record.config["folds"][str(u)] for u in fold.heldout_uuids} == {fold.index}
        sample = next(iter(fold.heldout_uuids))  # the labels came from this fold's model
        np.testing.assert_allclose(labels[sample].values, fold.model.values(by_uuid[sample]), atol=1e-6)
    assert result.record.value_model_version.startswith("crossfit-k3:")
    assert result.record.config["data"]["episodes"] == len(episodes)


def test_diagnostics_separate_good_from_bad_episodes_and_actions(episodes, result) -> None:
    diagnostics = result.record.diagnostics
    pooled = diagnostics["all"]
    assert pooled["p_positive_given_success"] > pooled["p_positive_given_failure"] + 0.15
    assert pooled["first_step_value_auc"] > 0.75
    assert pooled["value_return_correlation"] > 0.5
    assert diagnostics["sanity_ok"] and diagnostics["sanity_failures"] == []
    for figures in diagnostics["tasks"].values():
        assert figures["positive_fraction_autonomous"] == pytest.approx(0.4, abs=0.01)
    # forward moves are the good actions: they must be labelled positive more often than backward moves
    labels = {label.episode_uuid: label for label in result.record.labels}
    forward = np.concatenate([ep.actions[:, 0] > 0 for ep in episodes])
    autonomous = np.concatenate([ep.sources == StepSource.POLICY for ep in episodes])
    positive = np.concatenate([labels[ep.uuid].indicators for ep in episodes])
    assert positive[forward & autonomous].mean() > positive[~forward & autonomous].mean() + 0.2
    human = ~autonomous
    assert human.any() and positive[human].all()


def test_relabel_is_deterministic_and_returns_a_record(episodes) -> None:
    subset = episodes[:10] + episodes[30:40]
    first, second = relabel(subset, CONFIG), relabel(subset, CONFIG)
    assert first.method == "recap" and first.relabel_id is None
    for a, b in zip(first.labels, second.labels, strict=True):
        np.testing.assert_array_equal(a.indicators, b.indicators)
        assert a.indicators.dtype == bool and a.values.dtype == np.float32


def test_in_sample_relabel_is_refused_and_fresh_episodes_are_labelled(episodes) -> None:
    model = train_value(episodes[:20] + episodes[30:50], CONFIG.value)
    with pytest.raises(RecapInputError, match="training data"):
        relabel_with_model(episodes[:25], model, CONFIG)
    fresh = episodes[20:30] + episodes[50:60]
    record = relabel_with_model(fresh, model, CONFIG)
    assert record.value_model_version == model.version
    assert len(record.labels) == len(fresh)
    with pytest.raises(RecapInputError, match="value model: None"):
        relabel_with_model(fresh, None, CONFIG)


def test_sanity_floor_warns_loudly_on_uninformative_labels(caplog) -> None:
    rng = np.random.default_rng(5)
    noise = [
        make_episode(
            "noise", rng.normal(size=(30, 3)), np.zeros((30, 1)), Outcome(rng.choice(["success", "failure"]))
        )
        for _ in range(24)
    ]
    config = CONFIG.model_copy(update={"sanity": SanityFloor(min_first_step_auc=0.99)})
    with caplog.at_level(logging.WARNING, logger="recap.diagnostics"):
        record = relabel(noise, config)
    assert record.diagnostics["sanity_ok"] is False
    assert any("first_step_value_auc" in failure for failure in record.diagnostics["sanity_failures"])
    assert "SANITY FLOOR" in caplog.text


def test_task_without_failures_still_gets_requested_fraction() -> None:
    all_success = chain_dataset(seed=3, episodes_per_task=12, tasks=("easy",), p_forward_range=(1.0, 1.0))
    mixed = chain_dataset(seed=4, episodes_per_task=12, tasks=("mixed",), p_forward_range=(0.4, 0.9))
    assert all(ep.outcome == Outcome.SUCCESS for ep in all_success)
    record = relabel(all_success + mixed, CONFIG)
    easy = record.diagnostics["tasks"]["easy"]
    assert easy["positive_fraction_autonomous"] == pytest.approx(0.4, abs=0.05)
    assert easy["first_step_value_auc"] is None and easy["p_positive_given_failure"] is None
    assert record.diagnostics["single_outcome_tasks"] == ["easy"]


def test_degenerate_inputs_raise_clear_errors(episodes) -> None:
    with pytest.raises(RecapInputError, match="task 'lonely': 1 episode"):
        relabel([*episodes[:4], dataclasses.replace(episodes[5], task="lonely")], CONFIG)
    errored = dataclasses.replace(episodes[0], outcome=Outcome.ERROR)
    with pytest.raises(RecapInputError, match="outcome 'error'"):
        relabel([errored, *episodes[1:4]], CONFIG)
    with pytest.raises(RecapInputError, match="appears twice"):
        relabel([episodes[0], episodes[0], episodes[1]], CONFIG)
    with pytest.raises(ValueError, match="k_folds"):
        RelabelConfig(k_folds=1)


def test_conditioned_examples_follow_the_indicators(episodes, result) -> None:
    conditioned = conditioned_episodes(episodes[:3], result.record)
    assert (
        advantage_prompt(True) == "Advantage: positive" and advantage_prompt(False) == "Advantage: negative"
    )
    for item in conditioned:
        assert item.conditions == [advantage_prompt(bool(flag)) for flag in item.indicators]
        assert len(item.conditions) == item.episode.length
    stranger = chain_dataset(seed=9, episodes_per_task=1, tasks=("chain-a",))[0]
    with pytest.raises(RelabelMismatchError, match="not in relabel"):
        conditioned_episodes([stranger], result.record)
    shortened = dataclasses.replace(
        result.record, labels=[_truncate(label) for label in result.record.labels]
    )
    with pytest.raises(RelabelMismatchError, match="expected the episode length"):
        conditioned_episodes(episodes[:1], shortened)
    with pytest.raises(RelabelMismatchError, match="method"):
        conditioned_episodes(episodes[:1], dataclasses.replace(result.record, method="rlt"))


def _truncate(label: EpisodeLabels) -> EpisodeLabels:
    return EpisodeLabels(label.episode_uuid, label.values[:-1], label.advantages[:-1], label.indicators[:-1])


def test_baseline_selectors(episodes, result) -> None:
    everything = bc_all_weights(episodes)
    assert all(weights.min() == 1.0 for weights in everything.values())
    filtered = filtered_bc_weights(episodes)
    for episode in episodes:
        human = episode.sources == StepSource.HUMAN
        expected = np.ones(episode.length) if episode.outcome == Outcome.SUCCESS else human.astype(float)
        np.testing.assert_array_equal(filtered[episode.uuid], expected)
    weights = awr_weights(episodes, result.record)
    labels = {label.episode_uuid: label for label in result.record.labels}
    pooled_weights = np.concatenate([weights[ep.uuid] for ep in episodes])
    pooled_advantages = np.concatenate([labels[ep.uuid].advantages for ep in episodes])
    assert pooled_weights.max() <= 20.0 + 1e-4 and pooled_weights.min() > 0.0
    order = np.argsort(pooled_advantages[: episodes[0].length])
    assert np.all(np.diff(weights[episodes[0].uuid][order]) >= 0)  # monotone in the advantage within a task
    kept = advantage_filtered_weights(episodes, result.record)
    for episode in episodes:
        np.testing.assert_array_equal(kept[episode.uuid], labels[episode.uuid].indicators.astype(np.float32))
    assert 0.0 < np.concatenate(list(kept.values())).mean() < 1.0  # drops some steps, keeps others


def test_plots_write_pngs(tmp_path, episodes, result) -> None:
    with_intervention = next(ep for ep in episodes if ep.interventions and ep.outcome != Outcome.SUCCESS)
    scores = {item.episode.uuid: item for item in result.scores}
    value_png = plot_episode_values(
        with_intervention, result.record, tmp_path / "value.png", scores[with_intervention.uuid].returns
    )
    histogram_png = plot_advantage_histograms(episodes, result.record, tmp_path / "hist.png")
    for path in (value_png, histogram_png):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
