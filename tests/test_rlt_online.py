"""Online RLT (rlt.online's learner, actors.rlt_loop's RolloutWorker) on the 2-D reaching toy: improvement over the
prior, records, interventions, seeding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from actors.rlt_loop import RLTLoop
from actors.sinks import StoreSink
from envs.interventions import InterventionWrapper, TeleopCommand, TeleopContext
from envs.metaworld_env import GOAL, HAND, HANDOFF_PAIRS, OBJECT, PRIVILEGED_DIM
from rlt.diagnostics import critic_calibration
from rlt.errors import EmbeddingDimError, NonChunkActionError, RLTInputError
from rlt.online import OnlineConfig, OnlineRLT, chunk_transitions, episode_chunks_from_record
from rlt.phase import AlwaysCritical, DistanceSwitch, InfoKeySwitch, OperatorSwitch, handoff_switch
from rlt.rl_token import RLToken, RLTokenConfig
from rlt.state import EmbeddingPrior, RLStateEncoder, StateProjectionEmbedder
from rlt.td3 import LearnerConfig
from rlt.toy import BiasedReachPrior, PointReachEnv
from storage import ExperienceStore
from storage.records import EpisodeRecord, StepSource
from storage.spool import decode_episode, encode_episode

torch.set_num_threads(1)


def _prior(seed: int = 0, horizon: int = 10, embed_dim: int = 16) -> EmbeddingPrior:
    return EmbeddingPrior(
        BiasedReachPrior(noise=0.1, horizon=horizon, seed=seed),
        StateProjectionEmbedder(4, 4, embed_dim, seed=seed),
    )


def _token(seed: int = 0) -> RLToken:
    torch.manual_seed(seed)
    return RLToken(RLTokenConfig(num_tokens=4, embed_dim=16, z_dim=16, model_dim=32, encoder_layers=1))


def _loop(
    env=None, switch=None, seed: int = 0, records: list | None = None, learning_starts: int = 128, **config
) -> RLTLoop:
    settings = {"warmup_episodes": 20, "total_env_steps": 0, "token_steps": 50, "seed": seed, **config}
    env = env or PointReachEnv()
    learner = OnlineRLT(
        _prior(seed),
        switch or DistanceSwitch([0, 1], [2, 3], 0.15),
        _token(seed),
        OnlineConfig(task="point-reach", **settings),
        LearnerConfig(
            batch_size=128,
            learning_starts=learning_starts,
            net_arch=(128, 128),
            beta=0.05,  # β‖a − ã‖² over C×D = 20 entries: the strength this test was tuned with (β = 1 per entry)
            seed=seed,
        ),
        proprio_dim=4,
    )
    return RLTLoop(learner, lambda: env, on_episode=None if records is None else records.append)


def test_online_rlt_fixes_the_biased_prior_on_a_tight_tolerance() -> None:
    loop = _loop(total_env_steps=3000, eval_every_steps=1000, eval_episodes=30, seed=0)
    prior_success = loop.evaluate(30, mode="prior")
    curve = loop.run()
    late_success = np.mean([point.success_rate for point in curve[-2:]])
    assert prior_success <= 0.2
    assert late_success >= prior_success + 0.4, [(point.env_steps, point.success_rate) for point in curve]
    assert loop.rlt.learner.replay_buffer.size() > 200


def test_records_mark_the_hand_off_per_step() -> None:
    records: list[EpisodeRecord] = []
    loop = _loop(records=records, warmup_episodes=3, total_env_steps=150, learning_starts=8)
    loop.run()
    assert [record.metadata["mode"] for record in records[:3]] == ["prior"] * 3
    for record in records:
        record.validate()
        critical = np.asarray(record.metadata["critical_phase"])
        assert critical.shape == (record.length,)
        assert np.all(np.diff(critical) >= 0), "the hand-off is latched within an episode"
        assert record.chunks.shape[1:] == (10, 2) and record.reference_chunks.shape == record.chunks.shape
        assert record.rewards.sum() == (record.outcome == "success")
        acting = record.metadata["mode"] != "prior" and record.metadata["actor_updates"] > 0
        expected = [
            "rlt" if acting and flag else loop.rlt.prior.version for flag in record.metadata["critical_phase"]
        ]
        assert record.policy_versions == expected
        assert record.policy_version == (
            "rlt" if record.metadata["mode"] != "prior" else loop.rlt.prior.version
        )
        rl_chunks = record.chunk_ids[(record.chunk_offsets == 0) & (np.array(expected) == "rlt")]
        # the learner's chunk is what ran; the prior's ã rides beside it (equal wherever the prior acted)
        assert all(not np.allclose(record.chunks[c], record.reference_chunks[c]) for c in rl_chunks)
        prior_chunks = np.setdiff1d(np.arange(len(record.chunks)), rl_chunks)
        np.testing.assert_array_equal(record.chunks[prior_chunks], record.reference_chunks[prior_chunks])
    assert any(np.asarray(r.metadata["critical_phase"]).any() for r in records)
    assert any("rlt" in r.policy_versions for r in records), "the trained learner acted"
    assert any(not np.asarray(r.metadata["critical_phase"]).all() for r in records)


def test_a_truncated_episode_bootstraps_its_last_chunk_from_its_final_observation(tmp_path) -> None:
    """A time limit cuts the episode 5 steps into its third chunk (C = 10): the record keeps the observation
    after the last step (also through the store), and the last chunk's transition bootstraps from it with γ^5,
    not done (the learner with ``bootstrap_truncated``). A record without it (stored before it existed) drops
    that transition, as before."""
    env = PointReachEnv(tolerance=0.0, max_steps=25)  # never succeeds: every episode hits the time limit
    loop = _loop(env=env, switch=AlwaysCritical(), warmup_episodes=1)
    (record,) = loop.play("prior", 1)
    assert (record.outcome, record.length) == ("truncated", 25)
    final = record.final_observation
    moved = record.states[-1, :2] + 0.05 * np.clip(record.actions[-1], -1, 1)  # PointReachEnv.step by hand
    np.testing.assert_allclose(final["state"], np.concatenate([moved, record.states[-1, 2:]]), atol=1e-6)
    np.testing.assert_array_equal(final["privileged"], final["state"])
    store = ExperienceStore(f"sqlite:///{tmp_path / 'rlt.db'}")
    store.upgrade()
    store.register_policy_version(loop.rlt.prior.version, "scripted")
    store.write_episode(record)
    encoder, gamma = RLStateEncoder(None, 4), 0.5
    for episode in (record, store.load_episode(record.uuid)):
        chunks = episode_chunks_from_record(
            episode, loop.rlt.prior, 10, AlwaysCritical(), bootstrap_truncated=True
        )
        transitions = chunk_transitions(chunks, encoder, gamma)
        assert [t.state.tolist() for t in transitions] == [record.states[t].tolist() for t in (0, 10, 20)]
        last = transitions[-1]
        np.testing.assert_allclose(last.next_state, final["state"], atol=1e-6)
        assert (last.reward, last.discount, last.terminated) == (0.0, gamma**5, False)
        np.testing.assert_array_equal(last.action[:5], record.actions[20:])
        np.testing.assert_array_equal(
            last.action[5:], record.chunks[2, 5:]
        )  # the rows planned past the limit
        assert (
            transitions[1].discount == gamma**10
            and transitions[1].next_state.tolist() == record.states[20].tolist()
        )
    assert loop.rlt.episode_chunks([record])[0].final is None  # learner.bootstrap_truncated is off by default
    loop.rlt.learner.config = loop.rlt.learner.config.model_copy(update={"bootstrap_truncated": True})
    np.testing.assert_allclose(loop.rlt.episode_chunks([record])[0].final.proprio, final["state"])
    record.final_observation = None  # an old record: today's behaviour, the cut chunk is not learned from
    chunks = episode_chunks_from_record(
        record, loop.rlt.prior, 10, AlwaysCritical(), bootstrap_truncated=True
    )
    assert chunks.final is None
    assert len(chunk_transitions(chunks, encoder, gamma)) == 2


class _CountingPrior:
    """A ``Policy`` passing ``infer`` to ``prior`` and counting the calls."""

    def __init__(self, prior) -> None:
        self.prior, self.calls = prior, 0
        self.version, self.action_horizon, self.action_dim = (
            prior.version,
            prior.action_horizon,
            prior.action_dim,
        )

    def infer(self, batch):
        self.calls += 1
        return self.prior.infer(batch)

    def reset(self) -> None:
        self.prior.reset()


def _prior_calls(prior: _CountingPrior, work) -> tuple[int, object]:
    before = prior.calls
    result = work()
    return prior.calls - before, result


def test_the_learner_takes_the_actors_embeddings_from_the_record_instead_of_re_running_the_prior(
    tmp_path,
) -> None:
    """25-step episodes, C = 10: 3 chunks each, so the actor queries the prior 3 times per episode. The learner
    used to re-run it at each chunk start (3 more per episode: 6 in all); with the actor's embeddings in the
    record (``chunk_embeddings``) it runs 0 times (with ``bootstrap_truncated``, once: at the final observation,
    where the actor never acted), and the transitions are the same. The store and the spool keep no embeddings:
    records loaded back re-run the prior."""
    loop = _loop(
        env=PointReachEnv(tolerance=0.0, max_steps=25),
        switch=AlwaysCritical(),
        warmup_episodes=2,
        total_env_steps=50,
        learning_starts=4,
        eval_every_steps=0,
    )
    prior = loop.rlt.prior = _CountingPrior(loop.rlt.prior)
    acted, records = _prior_calls(prior, lambda: loop.play("prior", 2))
    assert [len(record.chunks) for record in records] == [3, 3] and acted == 6
    assert [record.chunk_embeddings.shape for record in records] == [(3, 4, 16)] * 2
    store = ExperienceStore(f"sqlite:///{tmp_path / 'rlt.db'}")
    store.upgrade()
    store.register_policy_version(prior.version, "scripted")
    for record in records:
        store.write_episode(record)
    loaded = [store.load_episode(record.uuid) for record in records]
    assert [record.chunk_embeddings for record in loaded] == [None, None]
    assert decode_episode(encode_episode(records[0])).chunk_embeddings is None
    handed, episodes = _prior_calls(prior, lambda: loop.rlt.episode_chunks(records))
    re_run, fallback = _prior_calls(prior, lambda: loop.rlt.episode_chunks(loaded))
    assert (handed, re_run) == (0, 6)
    for episode, again in zip(episodes, fallback, strict=True):
        for step, other in zip(episode.steps, again.steps, strict=True):
            np.testing.assert_allclose(step.context.embeddings, other.context.embeddings, rtol=1e-6)
            np.testing.assert_array_equal(step.context.reference, other.context.reference)
            np.testing.assert_array_equal(step.context.proprio, other.context.proprio)
    loop.rlt.learner.config = loop.rlt.learner.config.model_copy(update={"bootstrap_truncated": True})
    assert _prior_calls(prior, lambda: loop.rlt.episode_chunks(records))[0] == 2
    loop.rlt.learner.config = loop.rlt.learner.config.model_copy(update={"bootstrap_truncated": False})
    calls, _ = _prior_calls(prior, loop.run)
    assert (
        len(loop.stats) == 2 + 2 + 2
    )  # the records played above, then the run's warm-up and online episodes
    assert calls == 4 * 3  # 4 episodes of 3 chunks: the actor's queries only
    short = dataclasses.replace(records[0], chunk_embeddings=records[0].chunk_embeddings[:2])
    with pytest.raises(RLTInputError, match="one per recorded chunk"):
        loop.rlt.episode_chunks([short])


class _TakeOverBetweenSteps:
    """A teleop device pushing the point along +y during steps [3, 8) of every episode."""

    def reset(self, seed: int | None = None) -> None:
        """Stateless."""

    def poll(self, context: TeleopContext) -> TeleopCommand | None:
        if not 3 <= context.t < 8:
            return None
        return TeleopCommand(True, np.array([0.0, 1.0], np.float32), reason="test")


def test_env_interventions_replace_reference_and_action_in_the_buffer() -> None:
    records: list[EpisodeRecord] = []
    env = InterventionWrapper(PointReachEnv(), _TakeOverBetweenSteps())
    loop = _loop(env=env, switch=AlwaysCritical(), records=records, warmup_episodes=3)
    loop.run()
    buffer = loop.rlt.learner.replay_buffer
    size = buffer.size()
    _, references = buffer.split(buffer.observations[:size, 0])
    actions = buffer.actions[:size, 0].reshape(size, 10, 2)
    flagged = buffer.interventions[:size, 0]
    assert flagged.sum() == 3  # the first chunk of each episode holds the takeover
    np.testing.assert_allclose(references[flagged], actions[flagged])
    np.testing.assert_allclose(references[flagged][:, 3:8], np.tile([0.0, 1.0], (3, 5, 1)))
    proposed = np.stack([record.chunks[0] for record in records])
    assert not np.allclose(proposed[:, 3:8], references[flagged][:, 3:8])
    for record in records:
        assert record.sources[3:8].tolist() == [StepSource.HUMAN] * 5
        assert [(s.t_start, s.t_end, s.trigger) for s in record.interventions] == [(3, 8, "test")]
        assert record.policy_versions[3:8] == [None] * 5


def test_replay_seeded_from_the_store_matches_the_online_buffer(tmp_path) -> None:
    store = ExperienceStore(f"sqlite:///{tmp_path / 'rlt.db'}")
    store.upgrade()
    online = _loop(switch=AlwaysCritical(), records=[], warmup_episodes=4, total_env_steps=100)
    store.register_policy_version(online.rlt.prior.version, "scripted")
    store.register_policy_version(online.config.rl_version, "rlt")
    online.on_episode = store.write_episode
    online.run()
    records = list(store.iter_episodes(task="point-reach"))
    assert len(records) >= 5
    seeded = OnlineRLT(
        _prior(),
        AlwaysCritical(),
        online.rlt.token,
        online.config,
        online.rlt.learner.config,
        proprio_dim=4,
        token_fitted=True,
    )
    added = seeded.seed_from_records(records)
    assert added == online.rlt.learner.replay_buffer.size()  # both learned from the same records
    online_rows = _rows(online.rlt.learner.replay_buffer)
    for row in _rows(seeded.learner.replay_buffer):
        assert any(
            all(np.allclose(a, b, atol=1e-5) for a, b in zip(row, other, strict=True))
            for other in online_rows
        )


def _rows(buffer) -> list[tuple[np.ndarray, ...]]:
    size = buffer.size()
    arrays = (buffer.observations, buffer.actions, buffer.rewards, buffer.dones, buffer.discounts)
    return [tuple(np.asarray(array[index, 0]) for array in arrays) for index in range(size)]


def test_bad_priors_are_clear_errors() -> None:
    short = _loop(warmup_episodes=1)
    short.rlt.prior = _prior(horizon=5)
    with pytest.raises(NonChunkActionError, match=r"prior chunk: expected shape \(10, 2\)"):
        short.play("prior", 1)
    narrow = _loop(warmup_episodes=1)
    narrow.rlt.prior = _prior(embed_dim=8)
    with pytest.raises(EmbeddingDimError, match="embeddings: expected shape B×4×16"):
        narrow.run()
    bare = _loop(warmup_episodes=1)
    bare.rlt.prior = BiasedReachPrior()
    with pytest.raises(EmbeddingDimError, match="EmbeddingPrior"):
        bare.play("prior", 1)
    with pytest.raises(RLTInputError, match="RL token must be fitted"):
        _loop().play("learner", 1)
    with pytest.raises(RLTInputError, match="warmup_episodes"):
        _loop(warmup_episodes=0).run()


def test_handoff_switch_reads_the_layout_its_caller_passes() -> None:
    """The Meta-World hand-off pairs come from the env's 39-D layout (``HAND``/``OBJECT``/``GOAL``)."""
    privileged = np.zeros(PRIVILEGED_DIM, np.float32)
    privileged[HAND], privileged[OBJECT], privileged[GOAL] = (
        (0.0, 0.6, 0.2),
        (0.03, 0.6, 0.2),
        (0.3, 0.8, 0.2),
    )
    observation = {"images": {}, "state": np.zeros(7), "prompt": "", "privileged": privileged}
    assert handoff_switch(HANDOFF_PAIRS, "hand-object", 0.05).is_critical(observation, {})
    assert not handoff_switch(HANDOFF_PAIRS, "hand-goal", 0.05).is_critical(observation, {})
    assert isinstance(handoff_switch(HANDOFF_PAIRS, "object-goal", 0.0), AlwaysCritical)
    with pytest.raises(RLTInputError, match="hand-object"):
        handoff_switch(HANDOFF_PAIRS, "hand-peg", 0.05)
    with pytest.raises(RLTInputError, match="equal-length"):
        DistanceSwitch(slice(0, 3), slice(4, 6), 0.1)


def test_phase_switches() -> None:
    observation = PointReachEnv().reset(seed=0)[0]
    distance = np.linalg.norm(observation["privileged"][:2] - observation["privileged"][2:4])
    assert DistanceSwitch([0, 1], [2, 3], distance + 0.01).is_critical(observation, {})
    assert not DistanceSwitch([0, 1], [2, 3], distance - 0.01).is_critical(observation, {})
    with pytest.raises(RLTInputError, match="privileged"):
        DistanceSwitch([0], [1], 0.1).is_critical({"images": {}, "state": np.zeros(2), "prompt": ""}, {})
    assert InfoKeySwitch("near").is_critical(observation, {"near": True})
    assert not InfoKeySwitch("near").is_critical(observation, {})
    operator = OperatorSwitch()
    operator.engage()
    assert operator.is_critical(observation, {})
    operator.reset()
    assert not operator.is_critical(observation, {})


def test_online_episodes_are_committed_to_the_store_with_provenance(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'rlt.db'}"
    store = ExperienceStore(url)
    store.upgrade()
    env = InterventionWrapper(PointReachEnv(), _TakeOverBetweenSteps())
    loop = _loop(env=env, warmup_episodes=3, total_env_steps=120)
    loop.rlt.learner.learning_starts = 8
    store.register_policy_version(loop.rlt.prior.version, "scripted")
    store.register_policy_version(loop.config.rl_version, "rlt")
    loop.on_episode = StoreSink(url)
    loop.run()
    modes = [stats.mode for stats in loop.stats]
    assert store.count_episodes(task="point-reach") == len(loop.stats) == len(modes)
    assert modes[:3] == ["prior"] * 3 and set(modes[3:]) == {"learner"}
    stored = sorted(store.iter_episodes(task="point-reach"), key=lambda r: r.metadata["actor_updates"])
    assert sum(record.length for record in stored if record.metadata["mode"] == "learner") >= 120
    for record in stored:
        critical = np.asarray(record.metadata["critical_phase"], bool)
        human = record.sources == StepSource.HUMAN
        assert human[3:8].all() and not human[8:].any()
        assert [(s.t_start, s.t_end, s.trigger) for s in record.interventions] == [(3, 8, "test")]
        rl_acting = critical & ~human & (record.metadata["mode"] == "learner")
        expected = np.where(rl_acting, "rlt", loop.rlt.prior.version).astype(object)
        expected[human] = None
        assert record.policy_versions == expected.tolist()
    assert any(
        np.asarray(r.metadata["critical_phase"]).any() for r in stored if r.metadata["mode"] == "learner"
    )
    assert stored[-1].metadata["actor_updates"] > stored[0].metadata["actor_updates"] == 0


def test_run_warms_up_from_stored_episodes_alone(tmp_path) -> None:
    store = ExperienceStore(f"sqlite:///{tmp_path / 'rlt.db'}")
    store.upgrade()
    collector = _loop(records=[], warmup_episodes=6)
    store.register_policy_version(collector.rlt.prior.version, "scripted")
    collector.on_episode = store.write_episode
    collector.play("prior", 6)
    records = list(store.iter_episodes(task="point-reach"))
    for record in records:
        del record.metadata["critical_phase"]  # as from a plain collection: the switch marks the phase
    loop = _loop(warmup_episodes=0, total_env_steps=0)
    loop.run(records)
    assert loop.rlt.token_fitted
    episodes = [
        episode_chunks_from_record(r, loop.rlt.prior, 10, DistanceSwitch([0, 1], [2, 3], 0.15))
        for r in records
    ]
    expected = sum(len(chunk_transitions(episode, loop.rlt.encoder, 0.99)) for episode in episodes)
    assert loop.rlt.learner.replay_buffer.size() == expected > 0
    flags = [step.critical for episode in episodes for step in episode.steps]
    assert any(flags) and not all(flags), "the switch marks the hand-off in records without a flag"


def test_critic_calibration_pairs_each_critical_chunk_with_the_return_that_followed_it() -> None:
    loop = _loop(warmup_episodes=4, learning_starts=10_000)
    loop.warm_up()
    episodes = loop.rlt.episode_chunks(loop.play("eval", 30, seeds=[100 + index for index in range(30)]))
    # a stand-in critic whose value is readable: the x-coordinate of the state where the chunk started
    loop.rlt.learner.q_values = lambda states, references, chunks: states[:, -4]
    calibration = critic_calibration(loop.rlt.learner, loop.rlt.encoder, episodes)
    expected_q, expected_returns, gamma = [], [], loop.rlt.learner.config.gamma
    for episode in episodes:
        rewards = [reward for step in episode.steps for reward in step.rewards]
        start = 0
        for step in episode.steps:
            if step.critical:
                expected_q.append(step.context.proprio[0])
                expected_returns.append(
                    sum(gamma ** (t - start) * rewards[t] for t in range(start, len(rewards)))
                )
            start += len(step.rewards)
    assert calibration.chunks == len(expected_q) > 0
    assert sum(episode.steps[-1].terminated for episode in episodes) > 0  # some returns are non-zero
    assert calibration.mean_q == pytest.approx(np.mean(expected_q), rel=1e-5)
    assert calibration.mean_return == pytest.approx(np.mean(expected_returns), rel=1e-6)
    assert calibration.bias == pytest.approx(np.mean(expected_q) - np.mean(expected_returns), rel=1e-5)
