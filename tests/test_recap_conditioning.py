"""RECAP conditioning schemes: which samples get which condition text, through to the prompts training draws."""

from __future__ import annotations

import numpy as np

from policies.training import EpisodeArrays, _batch_prompts, build_dataset
from recap import NEGATIVE_PROMPT, POSITIVE_PROMPT, conditioned_episodes
from recap.synthetic import make_episode
from storage.records import EpisodeLabels, Outcome, RelabelRecord

PROMPT = "reach the goal"
FLAGS = np.array([True, False, False, True, False, True])


def record_for(flags: np.ndarray) -> tuple[list, RelabelRecord]:
    episode = make_episode("t", np.zeros((len(flags), 2)), np.zeros((len(flags), 1)), Outcome.SUCCESS)
    zeros = np.zeros(len(flags), dtype=np.float32)
    labels = EpisodeLabels(episode.uuid, zeros, zeros, flags)
    return [episode], RelabelRecord(method="recap", labels=[labels])


def test_explicit_and_positive_only_texts() -> None:
    episodes, record = record_for(FLAGS)
    (explicit,) = conditioned_episodes(episodes, record)
    assert explicit.conditions == [POSITIVE_PROMPT if f else NEGATIVE_PROMPT for f in FLAGS]
    (positive_only,) = conditioned_episodes(episodes, record, scheme="positive_only")
    assert positive_only.conditions == [POSITIVE_PROMPT if f else None for f in FLAGS]
    np.testing.assert_array_equal(positive_only.indicators, FLAGS)


def test_positive_only_trains_negatives_unconditioned_and_drops_positives_at_the_rate() -> None:
    episodes, record = record_for(FLAGS)
    (item,) = conditioned_episodes(episodes, record, scheme="positive_only")
    steps = len(FLAGS)
    arrays = EpisodeArrays({}, np.zeros((steps, 4), np.float32), np.zeros((steps, 4), np.float32), PROMPT)
    arrays.conditions = item.conditions
    dataset = build_dataset([arrays], 2)
    rng = np.random.default_rng(0)
    index = np.repeat(np.arange(steps), 2000)
    prompts = np.array(_batch_prompts(dataset, index, 0.3, rng)).reshape(steps, -1)
    conditioned = prompts == f"{PROMPT} {POSITIVE_PROMPT}"
    assert not conditioned[~FLAGS].any() and (prompts[~FLAGS] == PROMPT).all()  # negatives: never the text
    assert abs(conditioned[FLAGS].mean() - 0.7) < 0.03  # positives: the text 70% of the time (30% dropout)
    assert not any("negative" in prompt for prompt in prompts.ravel())
