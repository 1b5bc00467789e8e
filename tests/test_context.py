"""Episode-metadata prompts: words from stored metadata, and a policy trained and queried with them."""

from __future__ import annotations

import uuid

import numpy as np

from envs import EnvConfig, EnvSettings
from experiments.collection import CollectConfig, run_collection
from experiments.context import (
    DESIRED_METADATA,
    MetadataPromptConfig,
    metadata_conditions,
    metadata_prompt,
    quality_word,
    subtask_prompt,
    task_median_lengths,
)
from experiments.training import BCConfig, train_vla
from policies.base import stack_observations
from storage import EpisodeQuery, ExperienceStore, InterventionSegment, Outcome
from tests.storage_fixtures import make_episode


def _episode(length: int, outcome: Outcome, noise: float | None, interventions: bool = False):
    episode = make_episode(np.random.default_rng(length), length, outcome=outcome)
    episode.uuid = uuid.uuid4()
    episode.metadata = {} if noise is None else {"noise_std": noise}
    episode.interventions = [InterventionSegment(1, 3, "no_progress")] if interventions else []
    return episode


def test_quality_words_follow_noise_thresholds():
    config = MetadataPromptConfig()
    assert [quality_word(n, config) for n in (0.0, 0.1, 0.3, 0.5, 1.0)] == [
        "high",
        "high",
        "medium",
        "medium",
        "low",
    ]
    assert quality_word(None, config) is None


def test_prompt_describes_quality_speed_and_mistakes():
    fast_clean = _episode(20, Outcome.SUCCESS, 0.0)
    slow_corrected = _episode(60, Outcome.SUCCESS, 1.0, interventions=True)
    failed = _episode(40, Outcome.FAILURE, None)
    medians = task_median_lengths([fast_clean, slow_corrected, failed])
    assert medians == {fast_clean.task: 40.0}  # median of the successful lengths 20 and 60
    assert metadata_prompt(fast_clean, 40.0) == "quality: high, speed: fast, mistakes: none"
    assert metadata_prompt(slow_corrected, 40.0) == "quality: low, speed: slow, mistakes: some"
    assert metadata_prompt(failed, 40.0) == "speed: slow, mistakes: none"  # failures are never 'fast'
    conditions = metadata_conditions([fast_clean, slow_corrected, failed])
    assert len(conditions[slow_corrected.uuid]) == 60
    assert set(conditions[fast_clean.uuid]) == {"quality: high, speed: fast, mistakes: none"}


def test_metadata_conditioned_policy_trains_from_store_and_answers_the_desired_prompt(tmp_path):
    url = f"sqlite:///{tmp_path / 'meta.db'}"
    env = EnvConfig(task="reach-v3", width=48, height=48, max_episode_steps=40)
    for noise in (0.0, 1.0):
        run_collection(
            CollectConfig(
                env=env, policy="scripted", noise=noise, episodes=2, store_url=url, run_id=f"n{noise}"
            ),
            progress=False,
        )
    store = ExperienceStore(url)
    selection = EpisodeQuery(tasks=["reach-v3"])
    by_uuid = metadata_conditions(list(store.iter_episodes(task="reach-v3")))
    qualities = {text[0].split(",")[0] for text in by_uuid.values()}
    assert qualities == {"quality: high", "quality: low"}
    config = BCConfig(
        env=EnvSettings(cameras=("corner2",), image_size=48), steps=5, batch_size=4, condition_dropout=0.3
    )
    trained = train_vla(
        store, selection, config, tmp_path, conditions=lambda e: by_uuid[e.uuid], progress=False
    )
    observation = {
        "images": {"corner2": np.zeros((48, 48, 3), np.uint8)},
        "state": np.zeros(7, np.float32),
        "prompt": "reach the goal",
    }
    noise = np.random.default_rng(0).standard_normal((1, 10, 4)).astype(np.float32)
    desired = trained.policy.infer(
        stack_observations([observation]), conditions=DESIRED_METADATA, noise=noise
    )
    plain = trained.policy.infer(stack_observations([observation]), conditions=None, noise=noise)
    assert desired.actions.shape == (1, 10, 4)
    assert not np.allclose(desired.actions, plain.actions), "the metadata prompt must reach the model"


def test_scripted_demos_get_expert_phase_subtasks_in_the_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'phases.db'}"
    env = EnvConfig(task="pick-place-v3", render=False, max_episode_steps=120)
    run_collection(
        CollectConfig(env=env, policy="scripted", episodes=2, store_url=url, subtask_labels=True),
        progress=False,
    )
    episodes = list(ExperienceStore(url).iter_episodes())
    assert len(episodes) == 2
    for episode in episodes:
        assert episode.metadata["subtask_source"] == "expert_phase"
        assert len(episode.subtasks) == episode.length
        assert len(set(episode.subtasks)) >= 2, "pick-place moves through several phases"
        assert subtask_prompt(episode.subtasks[0]).startswith("subtask: phase")
