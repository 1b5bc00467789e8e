"""Label diagnostics a reviewer can trust: the sanity floor passes the good labels of the shipped reach config
(recorded held-out values of a real collection under configs/reach-recap.yaml) and fails broken ones (shuffled
labels, a constant value); labels against injected ground truth; P(positive) per expert phase; the conditioning
gap of a trained policy; the per-episode view."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.pipeline_config import load_pipeline_config
from policies.training import EpisodeArrays, TrainConfig, build_dataset, create_policy, train_bc
from policies.vla.config import VLAConfig
from recap import NEGATIVE_PROMPT, POSITIVE_PROMPT, AdvantageConfig, RelabelConfig, ValueConfig, cross_fit
from recap.conditioning import conditioning_gap
from recap.diagnostics import EpisodeScores, ground_truth_figures, label_diagnostics, phase_figures
from recap.plots import plot_episode_view
from recap.relabel import score_episodes
from recap.synthetic import chain_dataset, make_episode
from storage.records import EpisodeRecord, Outcome

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = load_pipeline_config(ROOT / "configs" / "reach-recap.yaml")


def recorded(name: str) -> tuple[list[EpisodeRecord], list[np.ndarray]]:
    """Episodes (outcome, length, human steps, injected marks) and their held-out values, as recorded."""
    data = np.load(ROOT / "tests" / "data" / f"{name}.npz")
    bounds = np.cumsum(np.concatenate([[0], data["lengths"]]))
    episodes, values = [], []
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        length = int(end - start)
        episode = make_episode(
            "reach-v3",
            np.zeros((length, 1), dtype=np.float32),
            np.zeros((length, 4), dtype=np.float32),
            Outcome.SUCCESS if data["success"][index] else Outcome.FAILURE,
            sources=data["human"][start:end].astype(np.uint8),
        )
        marks = [str(kind) or None for kind in data["injected"][start:end]]
        episode.injected = marks if any(marks) else None
        episodes.append(episode)
        values.append(data["values"][start:end].astype(np.float64))
    return episodes, values


def diagnose(episodes, values, config: RelabelConfig, shuffle_labels: bool = False) -> dict:
    """The relabel's diagnostics from these held-out values (labels optionally shuffled across steps)."""
    horizons = {"reach-v3": SHIPPED.env.max_episode_steps}
    scores, thresholds = score_episodes(episodes, values, horizons, config)
    if shuffle_labels:
        rng = np.random.default_rng(0)
        order = rng.permutation(sum(item.episode.length for item in scores))
        advantages = np.concatenate([item.advantages for item in scores])[order]
        indicators = np.concatenate([item.indicators for item in scores])[order]
        start = 0
        for item in scores:
            stop = start + item.episode.length
            item.advantages, item.indicators = advantages[start:stop], indicators[start:stop]
            start = stop
    return label_diagnostics(scores, thresholds, config.sanity)


@pytest.fixture(scope="module")
def shipped():
    return recorded("reach_recap_shipped")


def test_the_shipped_reach_config_passes_its_good_labels(shipped):
    diagnostics = diagnose(*shipped, SHIPPED.relabel)
    pooled = diagnostics["all"]
    assert diagnostics["sanity_ok"], diagnostics["sanity_failures"]
    assert pooled["value_return_correlation"] < 0.2  # what the old floor failed these labels on
    assert pooled["positive_gap"] > 0.3 and pooled["value_episode_rank"] > 0.4


def test_shuffled_labels_fail_the_floor(shipped):
    diagnostics = diagnose(*shipped, SHIPPED.relabel, shuffle_labels=True)
    assert not diagnostics["sanity_ok"]
    assert any("positive_gap" in failure for failure in diagnostics["sanity_failures"])


@pytest.mark.parametrize("broken", ["constant", "shuffled within episodes"])
def test_a_value_that_knows_nothing_fails_the_floor(shipped, broken):
    episodes, values = shipped
    rng = np.random.default_rng(1)
    mean = float(np.concatenate(values).mean())
    broken_values = [np.full_like(v, mean) if broken == "constant" else rng.permutation(v) for v in values]
    diagnostics = diagnose(episodes, broken_values, SHIPPED.relabel)
    assert not diagnostics["sanity_ok"]
    assert any("value_episode_rank" in failure for failure in diagnostics["sanity_failures"])


def test_ground_truth_figures_count_exactly():
    advantages = np.array([0.9, 0.8, -0.5, -0.4, 0.1, 0.7, -0.9, 0.0])
    indicators = advantages > 0.05
    autonomous = np.array([True] * 7 + [False])  # the human step is left out
    injected = [None, None, "detour", "detour", None, None, "pause", "detour"]
    figures = ground_truth_figures(advantages, indicators, autonomous, injected)
    assert figures["injected_steps"] == 3 and figures["injected_fraction"] == pytest.approx(3 / 7)
    assert figures["label_auc"] == 1.0  # every clean step's advantage above every injected one's
    assert figures["p_positive_injected"] == 0.0 and figures["p_positive_clean"] == 1.0
    assert figures["p_positive_by_kind"] == {"detour": 0.0, "pause": 0.0}
    assert ground_truth_figures(advantages, indicators, autonomous, [None] * 8) == {}
    phases = ["phase0", "phase0", "phase1", "phase1", None, "phase1", "phase2", "phase2"]
    assert phase_figures(indicators, autonomous, phases) == {
        "phase0": {"steps": 2, "p_positive": 1.0},
        "phase1": {"steps": 3, "p_positive": pytest.approx(1 / 3)},
        "phase2": {"steps": 1, "p_positive": 0.0},
    }


def test_labels_against_ground_truth_end_to_end(tmp_path):
    """Chain episodes whose backward moves are marked as injected detours: a cross-fitted relabel ranks them
    low (label AUC, P(positive)), passes the floor, and shuffled labels fail the ground-truth check."""
    episodes = chain_dataset(seed=3, episodes_per_task=24, tasks=("chain-a",), p_forward_range=(0.55, 0.9))
    for index, episode in enumerate(episodes):
        backward = episode.actions[:, 0] < 0
        episode.injected = ["detour" if bad else None for bad in backward] if backward.any() else None
        episode.subtasks = ["early" if t < 10 else "late" for t in range(episode.length)]
        episode.metadata = {"subtask_source": "expert_phase"} if index % 2 else {}
    episodes[0].run_id, episodes[0].injected = "demos", None  # a run without injections: not judged
    config = RelabelConfig(
        value=ValueConfig(hidden_dim=32, train_steps=150, batch_size=128, device="cpu"),
        advantage=AdvantageConfig(n_step=5),
    )
    result = cross_fit(episodes, config)
    pooled = result.record.diagnostics["all"]
    assert pooled["label_auc"] > 0.65
    assert pooled["p_positive_clean"] > pooled["p_positive_injected"] + 0.2
    assert set(pooled["p_positive_by_kind"]) == {"detour"}
    judged = sum(e.length for e in episodes[1:])
    assert pooled["injected_fraction"] == pytest.approx(pooled["injected_steps"] / judged)
    assert set(pooled["p_positive_by_phase"]) == {"early", "late"}  # from the expert-phase episodes only
    assert sum(p["steps"] for p in pooled["p_positive_by_phase"].values()) == sum(
        e.length for e in episodes[1::2]
    )
    assert "label_auc" in result.record.diagnostics["tasks"]["chain-a"]
    shuffled = _shuffled(result.scores)
    broken = label_diagnostics(shuffled, {"chain-a": 0.0}, config.sanity)
    assert not broken["sanity_ok"] and any("label_auc" in f for f in broken["sanity_failures"])
    view = plot_episode_view(episodes[:2], result.record, tmp_path / "view.png")
    assert view.stat().st_size > 10_000


def _shuffled(scores: list[EpisodeScores]) -> list[EpisodeScores]:
    rng = np.random.default_rng(0)
    advantages = rng.permutation(np.concatenate([item.advantages for item in scores]))
    bounds = np.cumsum([0] + [item.episode.length for item in scores])
    return [
        EpisodeScores(
            item.episode,
            item.values,
            item.returns,
            advantages[start:stop],
            advantages[start:stop] > 0,
            item.bootstrapped,
        )
        for item, start, stop in zip(scores, bounds[:-1], bounds[1:], strict=True)
    ]


def test_the_conditioning_gap_sees_whether_the_policy_reads_its_condition():
    """Positive samples act +0.8, negative ones −0.8: trained with the text, the positive prompt explains the
    positive samples far better than the negative one (or none); untrained, the prompts hardly differ."""
    rng = np.random.default_rng(0)
    episodes = [
        EpisodeArrays(
            images={},
            state=rng.normal(size=(24, 3)).astype(np.float32),
            actions=np.full((24, 2), 0.8 if k % 2 == 0 else -0.8, np.float32),
            prompt="reach the goal",
            conditions=[POSITIVE_PROMPT if k % 2 == 0 else NEGATIVE_PROMPT] * 24,
        )
        for k in range(4)
    ]
    dataset = build_dataset(episodes, horizon=4)
    config = VLAConfig.preset("tiny", cameras=(), state_dim=3, action_dim=2, action_horizon=4)
    policy = create_policy(config, dataset, seed=0)
    before = conditioning_gap(policy, dataset)
    train_bc(
        policy, dataset, TrainConfig(steps=40, batch_size=16, warmup_steps=5, progress=False, image_shift=0)
    )
    after = conditioning_gap(policy, dataset)
    assert after["samples"] == 48
    assert after["conditioning_gap"] > 1.0 > abs(before["conditioning_gap"])
    assert conditioning_gap(policy, dataset, negative=None)["conditioning_gap"] > 0.2
    assert conditioning_gap(policy, build_dataset(episodes[1:2], horizon=4))["conditioning_gap"] is None
