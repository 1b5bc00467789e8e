"""Experience store on SQLite and PostgreSQL: round trip, idempotency, validation, filters, sampling, relabels."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import uuid

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from storage import (
    EpisodeConflictError,
    EpisodeLabels,
    EpisodeQuery,
    EpisodeValidationError,
    ExperienceStore,
    InterventionSegment,
    NotFoundError,
    Outcome,
    RelabelRecord,
    SchemaNotReadyError,
    StoreError,
    UnknownPolicyVersionError,
)
from storage.limits import LIMITS
from storage.schema import Base
from storage.spool import decode_episode, encode_episode
from tests import storage_fixtures
from tests.storage_fixtures import POLICY_VERSION, assert_episodes_equal, make_episode

store, store_url = storage_fixtures.store, storage_fixtures.store_url
pg_database, pg_migrated = storage_fixtures.pg_database, storage_fixtures.pg_migrated


def test_upgrade_from_empty_creates_every_table_at_head(store_url: str) -> None:
    experience = ExperienceStore(store_url)
    assert experience.schema_revision() is None
    experience.upgrade()
    experience.upgrade()  # idempotent
    assert experience.schema_revision() == experience.head_revision()
    tables = set(sa.inspect(sa.create_engine(store_url)).get_table_names())
    expected = {"runs", "policy_versions", "episodes", "steps", "chunks", "images", "step_images"}
    expected |= {"interventions", "relabels", "relabel_values", "evaluations", "alembic_version"}
    assert expected <= tables
    assert experience.stats()["episodes"] == 0
    experience.close()


def test_migrated_database_matches_the_schema_models(store_url: str) -> None:
    """Alembic autogenerate finds no difference between the migrations' result and ``storage/schema.py``."""
    experience = ExperienceStore(store_url)
    experience.upgrade()
    experience.close()
    engine = sa.create_engine(store_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert differences == []


def test_validation_limits_are_the_migrated_columns(store_url: str) -> None:
    """``storage.limits`` (what validation checks without sqlalchemy) names real columns with their real sizes."""
    ExperienceStore(store_url).upgrade()
    inspector = sa.inspect(sa.create_engine(store_url))
    for limit in LIMITS:
        table, name = limit.column.split(".")
        (column,) = [column for column in inspector.get_columns(table) if column["name"] == name]
        if limit.bits is not None:
            bits = {sa.BigInteger: 64, sa.SmallInteger: 16, sa.Integer: 32}
            assert next(n for kind, n in bits.items() if isinstance(column["type"], kind)) == limit.bits
        else:
            assert column["type"].length == limit.length, limit.column


def test_sqlite_store_journals_in_wal_mode(tmp_path) -> None:
    experience = ExperienceStore(f"sqlite:///{tmp_path / 'store.db'}")
    experience.upgrade()
    experience.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as connection:  # WAL persists in the file
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("read", ["list_runs", "policy_versions", "list_episodes", "stats"])
def test_reads_on_a_store_without_schema_name_the_upgrade_command(store_url: str, read: str) -> None:
    experience = ExperienceStore(store_url)
    with pytest.raises(SchemaNotReadyError, match="flywheel db upgrade"):
        getattr(experience, read)()
    experience.close()


def test_round_trip_is_exact_for_arrays_images_interventions_and_metadata(store: ExperienceStore) -> None:
    rng = np.random.default_rng(0)
    record = make_episode(rng, 60, cameras=("corner", "wrist"), run_id="run-1")
    record.subtasks = ["reach"] * 30 + ["grasp"] * 30
    record.injected = [None] * 10 + ["detour"] * 15 + [None] * 35
    record.prompt = "reach the red target, gently"
    record.error = None
    assert store.write_episode(record) is True
    loaded = store.load_episode(record.uuid)
    assert_episodes_equal(loaded, record)
    assert loaded.injected[10:25] == ["detour"] * 15 and loaded.prompt == record.prompt
    assert store.list_episodes()[0].prompt == record.prompt
    assert loaded.interventions == [InterventionSegment(20, 24, "no_progress")]
    without_images = store.load_episode(str(record.uuid), images=False)
    assert without_images.images == {}
    assert_episodes_equal(without_images, record, images=False)


def test_reference_chunks_ride_beside_the_executed_chunks(store: ExperienceStore, tmp_path) -> None:
    """RLT's reference ``ã`` per chunk (``chunks.reference``, migration 0004) round-trips through the store and the
    robot's spool; episodes without it read back None; a wrong shape is a one-field error."""
    rng = np.random.default_rng(3)
    record = make_episode(rng, 20, cameras=())
    record.reference_chunks = (record.chunks + 0.25).astype(np.float32)
    plain = make_episode(rng, 8, cameras=())
    for episode in (record, plain):
        assert store.write_episode(episode)
        assert_episodes_equal(store.load_episode(episode.uuid), episode)
    assert store.load_episode(plain.uuid).reference_chunks is None
    assert_episodes_equal(decode_episode(encode_episode(record)), record)
    record.reference_chunks = record.reference_chunks[:, :1]
    with pytest.raises(EpisodeValidationError, match="reference_chunks"):
        record.validate()


def _final_observation(record, rng: np.random.Generator) -> dict:
    """An observation shaped as ``record``'s steps' (what ``EpisodeRecorder`` keeps after a time limit)."""
    final = {
        "images": {camera: frames[0] + 1 for camera, frames in record.images.items()},
        "state": rng.standard_normal(record.states.shape[1]).astype(np.float32),
        "prompt": "reach the red target",
    }
    if record.privileged is not None:
        final["privileged"] = rng.standard_normal(record.privileged.shape[1]).astype(np.float32)
    return final


def test_final_observation_of_a_truncated_episode_round_trips(store: ExperienceStore) -> None:
    """A truncated episode's observation after its last step (``episodes.final_observation``, migration 0005)
    round-trips through the store (frames only with ``images=True``, as the steps' frames) and the robot's
    spool; an episode without one, as every episode stored before it existed, reads back None; the content
    hash covers it; only a truncated episode may carry one, shaped as its steps' observations."""
    rng = np.random.default_rng(7)
    record = make_episode(rng, 12, cameras=("corner",), outcome=Outcome.TRUNCATED)
    record.final_observation = _final_observation(record, rng)
    plain = make_episode(rng, 8, cameras=(), outcome=Outcome.TRUNCATED)
    for episode in (record, plain):
        assert store.write_episode(episode)
    assert store.load_episode(plain.uuid).final_observation is None
    assert store.list_episodes()[0].uuid == record.uuid  # listing does not need the column
    for loaded, images in (
        (store.load_episode(record.uuid), True),
        (store.load_episode(record.uuid, images=False), False),
        (decode_episode(encode_episode(record)), True),
    ):
        final, expected = loaded.final_observation, record.final_observation
        assert (
            sorted(final) == ["images", "privileged", "prompt", "state"]
            and final["prompt"] == expected["prompt"]
        )
        for key in ("state", "privileged"):
            assert final[key].dtype == np.float32 and final[key].tobytes() == expected[key].tobytes()
            final[key][0] = 0.0  # writable, like every array a read returns
        assert sorted(final["images"]) == (["corner"] if images else [])
        if images:
            np.testing.assert_array_equal(final["images"]["corner"], expected["images"]["corner"])
    changed = dataclasses.replace(record, final_observation={**record.final_observation, "prompt": "other"})
    with pytest.raises(EpisodeConflictError):
        store.write_episode(changed)
    bad_state = {**record.final_observation, "state": record.final_observation["state"][:3]}
    cases = [
        (dataclasses.replace(record, outcome=Outcome.SUCCESS), "final_observation: expected None unless"),
        (
            dataclasses.replace(record, final_observation=bad_state),
            r"final_observation\.state: expected float32",
        ),
        (dataclasses.replace(plain, final_observation=_final_observation(record, rng)), "final_observation"),
    ]
    for episode, message in cases:
        with pytest.raises(EpisodeValidationError, match=message):
            episode.validate()


def test_episode_without_privileged_state_or_images_and_empty_episode(store: ExperienceStore) -> None:
    rng = np.random.default_rng(1)
    plain = make_episode(rng, 12, cameras=(), privileged=False)
    empty = make_episode(rng, 0, cameras=(), outcome=Outcome.ERROR)
    empty.error = "env crashed at reset"
    for record in (plain, empty):
        assert store.write_episode(record)
        assert_episodes_equal(store.load_episode(record.uuid), record)


def test_identical_resubmission_is_a_no_op(store: ExperienceStore) -> None:
    record = make_episode(np.random.default_rng(2), 30)
    assert store.write_episode(record) is True
    assert store.write_episode(record) is False
    assert store.write_episode(dataclasses.replace(record, states=record.states.copy())) is False
    stats = store.stats()
    assert (stats["episodes"], stats["steps"]) == (1, 30)


def test_same_uuid_with_different_content_is_a_conflict_and_changes_nothing(store: ExperienceStore) -> None:
    record = make_episode(np.random.default_rng(3), 30)
    store.write_episode(record)
    changed = dataclasses.replace(record, rewards=record.rewards + 1, run_id="other-run")
    with pytest.raises(EpisodeConflictError, match=str(record.uuid)):
        store.write_episode(changed)
    assert_episodes_equal(store.load_episode(record.uuid), record)
    assert store.stats()["runs"] == 0


def _bad(record, **changes):
    return dataclasses.replace(record, **changes)


BAD_INPUTS = {
    "states dtype": (lambda r: _bad(r, states=r.states.astype(np.float64)), "states", "float32"),
    "actions shape": (lambda r: _bad(r, actions=r.actions[:-1]), "states", "T=19"),
    "rewards NaN": (
        lambda r: _bad(r, rewards=np.where(np.arange(20) == 5, np.nan, r.rewards).astype(np.float32)),
        "rewards",
        "finite",
    ),
    "actions inf": (lambda r: _bad(r, actions=np.full_like(r.actions, np.inf)), "actions", "finite"),
    "states NaN": (lambda r: _bad(r, states=np.full_like(r.states, np.nan)), "states", "finite"),
    "chunks NaN": (lambda r: _bad(r, chunks=np.full_like(r.chunks, np.nan)), "chunks", "finite"),
    "outcome": (lambda r: _bad(r, outcome="won"), "outcome", "success/failure/truncated/error"),
    "terminated length": (lambda r: _bad(r, terminated=r.terminated[:5]), "terminated", "T=20"),
    "policy_versions length": (
        lambda r: _bad(r, policy_versions=r.policy_versions[:3]),
        "policy_versions",
        "T=20",
    ),
    "chunk id out of range": (
        lambda r: _bad(r, chunk_ids=np.full(20, 99, np.int32)),
        "chunk_ids",
        "-1 or a row",
    ),
    "chunk offset out of range": (
        lambda r: _bad(r, chunk_offsets=np.full(20, 7, np.int32)),
        "chunk_offsets",
        "0..4",
    ),
    "sources value": (lambda r: _bad(r, sources=np.full(20, 3, np.uint8)), "sources", "StepSource"),
    "image dtype": (
        lambda r: _bad(r, images={"corner": r.images["corner"].astype(np.float32)}),
        "images['corner']",
        "uint8",
    ),
    "image frames": (
        lambda r: _bad(r, images={"corner": r.images["corner"][:4]}),
        "images['corner']",
        "T=20",
    ),
    "intervention range": (
        lambda r: _bad(r, interventions=[InterventionSegment(15, 25, "x")]),
        "interventions[0]",
        "t_end <= T=20",
    ),
    "metadata NaN": (lambda r: _bad(r, metadata={"score": float("nan")}), "metadata", "JSON"),
    "uuid type": (lambda r: _bad(r, uuid=str(r.uuid)), "uuid", "uuid.UUID"),
    "negative latency": (
        lambda r: _bad(r, latency_ms=np.full(20, -1, np.float32)),
        "latency_ms",
        "non-negative",
    ),
    # what one backend would refuse is refused on both, before SQL (limits from the schema's columns)
    "seed 2^64-1": (lambda r: _bad(r, seed=2**64 - 1), "seed", "signed 64-bit"),
    "task 300 chars": (lambda r: _bad(r, task="t" * 300), "task", "at most 256 characters"),
    "run id 129 chars": (lambda r: _bad(r, run_id="r" * 129), "run_id", "at most 128 characters"),
    "NUL in error": (lambda r: _bad(r, error="boom\x00"), "error", "NUL"),
    "NUL in subtask": (lambda r: _bad(r, subtasks=["reach\x00"] * 20), "subtasks[0]", "NUL"),
    "metadata 1000 deep": (lambda r: _bad(r, metadata=_nested(1000)), "metadata", "nested at most 64"),
    "metadata inf": (lambda r: _bad(r, metadata={"a": [1.0, float("inf")]}), "metadata", "finite"),
}


def _nested(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_typed_error_naming_the_field_and_nothing_is_written(
    store: ExperienceStore, case: str
) -> None:
    corrupt, field_name, expected = BAD_INPUTS[case]
    record = corrupt(make_episode(np.random.default_rng(4), 20))
    with pytest.raises(EpisodeValidationError) as error:
        store.write_episode(record)
    assert error.value.field_name == field_name
    assert expected in str(error.value)
    assert store.stats()["episodes"] == 0 and store.stats()["steps"] == 0 and store.stats()["images"] == 0


def test_unknown_policy_version_is_rejected_before_anything_is_written(store: ExperienceStore) -> None:
    record = make_episode(np.random.default_rng(5), 20)
    record.policy_versions[7] = "never-registered"
    with pytest.raises(UnknownPolicyVersionError, match=r"policy_versions\[7\].*never-registered"):
        store.write_episode(record)
    with pytest.raises(UnknownPolicyVersionError, match="policy_version"):
        store.write_episode(make_episode(np.random.default_rng(6), 20, policy_version="ghost"))
    assert store.stats()["episodes"] == 0
    store.register_policy_version("never-registered", kind="vla", parent=POLICY_VERSION, metadata={"step": 7})
    assert store.write_episode(record)
    versions = {v["version"]: v for v in store.policy_versions()}
    assert versions["never-registered"]["parent"] == POLICY_VERSION
    assert versions["never-registered"]["metadata"] == {"step": 7}
    assert store.load_episode(record.uuid).policy_versions[7] == "never-registered"


def test_one_version_is_looked_up_by_name_and_versions_by_uri_prefix(store: ExperienceStore) -> None:
    """``policy_version`` answers with the same row ``policy_versions`` lists (parent by name), or None;
    ``policy_versions(uri_prefix=…)`` keeps the checkpoints under a folder (LIKE wildcards taken literally)."""
    store.register_policy_version(
        "vla-v3", kind="vla", uri="/ckpt/v3", parent=POLICY_VERSION, metadata={"k": 1}
    )
    row = store.policy_version("vla-v3")
    assert row == next(v for v in store.policy_versions() if v["version"] == "vla-v3")
    assert (row["kind"], row["uri"], row["parent"], row["metadata"]) == (
        "vla",
        "/ckpt/v3",
        POLICY_VERSION,
        {"k": 1},
    )
    assert store.policy_version(POLICY_VERSION)["parent"] is None
    assert store.policy_version("vla-v") is None and store.policy_version("ghost") is None
    store.register_policy_version("vla-v4", kind="vla", uri="/ckpt_x/v4")
    under = [row["version"] for row in store.policy_versions(uri_prefix="/ckpt/")]
    assert under == ["vla-v3"] and store.policy_versions(uri_prefix="/ckpt/")[0] == row
    assert [row["version"] for row in store.policy_versions(uri_prefix="/ckpt_")] == ["vla-v4"], (
        "_ is literal"
    )


def test_filters_list_count_and_iterate(store: ExperienceStore) -> None:
    rng = np.random.default_rng(7)
    store.register_policy_version("vla-v2", kind="vla", parent=POLICY_VERSION)
    specs = [
        ("pick-place-v3", Outcome.SUCCESS, POLICY_VERSION, "run-a"),
        ("pick-place-v3", Outcome.FAILURE, POLICY_VERSION, "run-a"),
        ("pick-place-v3", Outcome.SUCCESS, "vla-v2", "run-b"),
        ("door-open-v3", Outcome.TRUNCATED, "vla-v2", "run-b"),
        ("door-open-v3", Outcome.SUCCESS, POLICY_VERSION, None),
    ]
    records = [
        make_episode(rng, 15, task=task, outcome=outcome, policy_version=version, run_id=run)
        for task, outcome, version, run in specs
    ]
    for record in records:
        store.write_episode(record)
    assert [s.uuid for s in store.list_episodes()] == [r.uuid for r in records]
    assert [s.uuid for s in store.list_episodes(task="door-open-v3")] == [records[3].uuid, records[4].uuid]
    assert [s.uuid for s in store.list_episodes(outcome="success", policy_version=POLICY_VERSION)] == [
        records[0].uuid,
        records[4].uuid,
    ]
    assert [s.uuid for s in store.list_episodes(run_id="run-b", limit=1)] == [records[2].uuid]
    assert store.count_episodes(task="pick-place-v3", outcome=Outcome.SUCCESS) == 2
    assert store.count_steps(run_id="run-b") == 30 and store.count_steps(task="door-open-v3") == 30
    assert store.count_steps(run_id="no-such-run") == 0 and store.count_steps() == 75
    summary = store.list_episodes(task="door-open-v3", outcome="truncated")[0]
    assert (summary.length, summary.human_steps, summary.policy_version) == (15, 4, "vla-v2")
    assert summary.total_reward == pytest.approx(float(records[3].rewards.sum()), rel=1e-6)
    assert summary.metadata == records[3].metadata
    loaded = list(store.iter_episodes(task="pick-place-v3", images=True))
    for got, expected in zip(loaded, records[:3], strict=True):
        assert_episodes_equal(got, expected)
    with pytest.raises(EpisodeValidationError, match="outcome"):
        store.list_episodes(outcome="won")
    stats = store.stats()
    assert stats["episodes_by_task"] == {
        "door-open-v3": {"success": 1, "truncated": 1},
        "pick-place-v3": {"failure": 1, "success": 2},
    }
    assert stats["runs"] == 2 and stats["steps"] == 75 and stats["human_steps"] == 20
    assert sorted(run["id"] for run in store.list_runs(prefix="run-")) == ["run-a", "run-b"]


def test_images_are_content_addressed_and_shared(store: ExperienceStore) -> None:
    rng = np.random.default_rng(8)
    first = make_episode(rng, 20)
    second = make_episode(rng, 20)
    second.images = {"corner": first.images["corner"].copy()}  # the very same frames
    store.write_episode(first)
    store.write_episode(second)
    stats = store.stats()
    assert stats["images"] == 19  # 20 frames, frame 1 repeats frame 0, and episode 2 adds nothing
    assert 0 < stats["image_bytes"] < 19 * first.images["corner"][0].nbytes
    assert_episodes_equal(store.load_episode(second.uuid), second)


def test_sampled_windows_stay_inside_one_episode_and_match_the_stored_steps(store: ExperienceStore) -> None:
    rng = np.random.default_rng(9)
    records = [make_episode(rng, length, cameras=()) for length in (3, 7, 12, 30)]
    for record in records:
        store.write_episode(record)
    by_id = {}
    batch = store.sample_transitions(512, np.random.default_rng(0), n_step=5)
    replay = store.replay()
    by_id = {episode_id: next(r for r in records if r.uuid == u) for episode_id, u in replay.uuids.items()}
    assert (
        batch.states.shape == (512, 7)
        and batch.actions.shape == (512, 5, 4)
        and batch.rewards.shape == (512, 5)
    )
    for i in range(512):
        record, t = by_id[int(batch.episode_ids[i])], int(batch.t[i])
        valid = min(5, record.length - t)
        assert batch.mask[i].tolist() == [True] * valid + [False] * (5 - valid)
        assert np.array_equal(batch.states[i], record.states[t])
        assert np.array_equal(batch.actions[i, :valid], record.actions[t : t + valid])
        assert np.array_equal(batch.rewards[i, :valid], record.rewards[t : t + valid])
        assert not batch.rewards[i, valid:].any() and not batch.actions[i, valid:].any()
        assert np.array_equal(batch.sources[i, :valid], record.sources[t : t + valid])
        assert batch.has_next[i] == (t + 5 < record.length)
        if batch.has_next[i]:
            assert np.array_equal(batch.next_states[i], record.states[t + 5])
            assert np.array_equal(batch.next_privileged[i], record.privileged[t + 5])
        assert batch.terminated[i] == bool(record.terminated[t : t + valid].any())
        assert batch.truncated[i] == bool(record.truncated[t : t + valid].any())
    counts = np.bincount([list(by_id).index(int(e)) for e in batch.episode_ids], minlength=4)
    assert counts.argmax() == 3 and counts.argmin() == 0  # uniform over steps: longer episodes more often
    again = store.sample_transitions(512, np.random.default_rng(0), n_step=5)
    assert np.array_equal(again.states, batch.states)  # seeded


def test_sampling_picks_up_new_episodes_filters_and_fetches_images(store: ExperienceStore) -> None:
    rng = np.random.default_rng(10)
    first = make_episode(rng, 10, task="reach-v3")
    store.write_episode(first)
    assert store.replay(task="reach-v3").size == 10
    second = make_episode(rng, 6, task="reach-v3")
    store.write_episode(second)
    store.write_episode(make_episode(rng, 8, task="door-open-v3"))
    assert store.replay(task="reach-v3", refresh=False).size == 10  # the cached index, no query
    assert store.replay(task="reach-v3").size == 16
    batch = store.sample_transitions(32, np.random.default_rng(1), n_step=2, task="reach-v3", images=True)
    by_uuid = {first.uuid: first, second.uuid: second}
    replay = store.replay(task="reach-v3")
    for i in range(32):
        record = by_uuid[replay.uuids[int(batch.episode_ids[i])]]
        t = int(batch.t[i])
        assert np.array_equal(batch.images["corner"][i], record.images["corner"][t])
        next_t = t + 2 if batch.has_next[i] else t
        assert np.array_equal(batch.next_images["corner"][i], record.images["corner"][next_t])
    with pytest.raises(NotFoundError, match="tasks='no-such-task'"):
        store.sample_transitions(4, rng, task="no-such-task")
    store.write_episode(make_episode(rng, 5, task="reach-v3", outcome=Outcome.FAILURE))
    failures = store.replay(task="reach-v3", outcome="failure")
    assert failures.size == 5
    assert (
        store.replay(task="reach-v3", outcome=Outcome.FAILURE, refresh=False) is failures
    )  # one cache entry


def test_episode_query_normalizes_outcome_and_names_its_filters() -> None:
    query = EpisodeQuery(tasks=["reach-v3"], outcomes=["success"])
    assert query.outcomes == (Outcome.SUCCESS,) and query.tasks == ("reach-v3",)
    assert query == EpisodeQuery.of("reach-v3", Outcome.SUCCESS) and hash(query) == hash(
        EpisodeQuery(("reach-v3",), ("success",))
    )
    assert str(query) == "episodes with tasks='reach-v3', outcomes='success'"
    assert (
        str(EpisodeQuery(run_ids=("a", "b"), max_per_task=2)) == "episodes with run_ids='a|b', max_per_task=2"
    )
    assert str(EpisodeQuery()) == "all episodes"
    with pytest.raises(
        EpisodeValidationError, match="outcome: expected one of success/failure/truncated/error"
    ):
        EpisodeQuery(outcomes=["won"])
    with pytest.raises(EpisodeValidationError, match="tasks: expected a tuple or list of values"):
        EpisodeQuery(tasks="reach-v3")
    with pytest.raises(EpisodeValidationError, match="max_per_task: expected at least 1"):
        EpisodeQuery(max_per_task=0)


def test_episode_query_compiles_each_tuple_to_an_in_clause(store: ExperienceStore) -> None:
    """Several tasks, runs and outcomes in one query; ``max_per_task`` keeps the oldest per task (both backends)."""
    rng = np.random.default_rng(5)
    rows = [
        ("reach-v3", "a", Outcome.SUCCESS),
        ("reach-v3", "b", Outcome.FAILURE),
        ("push-v3", "a", Outcome.ERROR),
        ("push-v3", "b", Outcome.SUCCESS),
        ("reach-v3", "c", Outcome.SUCCESS),
        ("push-v3", "a", Outcome.TRUNCATED),
        ("reach-v3", "a", Outcome.TRUNCATED),
    ]
    stored = []
    for task, run, outcome in rows:
        episode = make_episode(rng, 3, task=task, run_id=run, outcome=outcome, cameras=())
        store.write_episode(episode)
        stored.append(episode.uuid)

    def found(**filters) -> list[int]:
        return [stored.index(s.uuid) for s in store.find_episodes(EpisodeQuery(**filters))]

    assert found() == list(range(7))
    assert found(tasks=["reach-v3", "push-v3"], run_ids=["a", "b"]) == [0, 1, 2, 3, 5, 6]
    assert found(run_ids=["a"], outcomes=["success", "truncated"]) == [0, 5, 6]
    assert found(tasks=["reach-v3"], outcomes=["success", "failure", "truncated"], max_per_task=2) == [0, 1]
    assert found(outcomes=["success", "truncated"], max_per_task=1) == [0, 3]
    assert found(policy_versions=[POLICY_VERSION], tasks=["push-v3"]) == [2, 3, 5]
    assert found(tasks=[]) == []
    assert store.find_episodes(EpisodeQuery(), limit=2, newest_first=True)[0].uuid == stored[-1]


def test_relabels_are_versioned_and_never_overwrite(store: ExperienceStore) -> None:
    rng = np.random.default_rng(11)
    records = [make_episode(rng, n, cameras=()) for n in (8, 5)]
    for record in records:
        store.write_episode(record)

    def labels(offset: float) -> list[EpisodeLabels]:
        return [
            EpisodeLabels(
                r.uuid,
                values=(np.arange(r.length) + offset).astype(np.float32),
                advantages=np.linspace(-1, 1, r.length).astype(np.float32) * offset,
                indicators=np.arange(r.length) % 2 == 0,
            )
            for r in records
        ]

    first_id = store.write_relabel(
        RelabelRecord("recap", labels(1.0), value_model_version="value-1", config={"eps": 0.3})
    )
    second_id = store.write_relabel(
        RelabelRecord("recap", labels(2.0), parent_id=first_id, diagnostics={"positive": 0.4})
    )
    first, second = store.load_relabel(first_id), store.load_relabel(second_id)
    assert (first.version, second.version) == (1, 2)
    assert second.parent_id == first_id and first.value_model_version == "value-1"
    assert first.config == {"eps": 0.3} and second.diagnostics == {"positive": 0.4}
    for loaded, expected in ((first, labels(1.0)), (second, labels(2.0))):
        got = {lab.episode_uuid: lab for lab in loaded.labels}
        for lab in expected:
            assert got[lab.episode_uuid].values.tobytes() == lab.values.tobytes()
            assert got[lab.episode_uuid].advantages.tobytes() == lab.advantages.tobytes()
            assert np.array_equal(got[lab.episode_uuid].indicators, lab.indicators)
    assert [r.relabel_id for r in store.list_relabels("recap")] == [first_id, second_id]
    with pytest.raises(StoreError, match="never overwritten"):
        store.write_relabel(RelabelRecord("recap", labels(3.0), relabel_id=first_id))
    assert store.load_relabel(first_id).labels[0].values.tobytes() == labels(1.0)[0].values.tobytes()
    short = labels(1.0)
    first_labels = short[0]
    short[0] = EpisodeLabels(
        first_labels.episode_uuid,
        first_labels.values[:3],
        first_labels.advantages[:3],
        first_labels.indicators[:3],
    )
    with pytest.raises(EpisodeValidationError, match=r"values: expected float32 array of shape T=8"):
        store.write_relabel(RelabelRecord("recap", short))
    with pytest.raises(NotFoundError, match="not in the store"):
        store.write_relabel(
            RelabelRecord("recap", [dataclasses.replace(labels(1.0)[0], episode_uuid=uuid.uuid4())])
        )
    assert len(store.list_relabels()) == 2


def test_evaluations_round_trip(store: ExperienceStore) -> None:
    evaluation_id = store.write_evaluation(
        POLICY_VERSION, "pick-place-v3", 20, 17, {"mean_return": 412.5}, "run-1"
    )
    (summary,) = store.list_evaluations(policy_version=POLICY_VERSION)
    assert summary.id == evaluation_id and summary.success_rate == pytest.approx(0.85)
    assert summary.metrics == {"mean_return": 412.5} and summary.run_id == "run-1"
    with pytest.raises(UnknownPolicyVersionError):
        store.write_evaluation("ghost", "pick-place-v3", 10, 1)
    with pytest.raises(EpisodeValidationError, match="successes"):
        store.write_evaluation(POLICY_VERSION, "pick-place-v3", 10, 11)


def test_load_of_unknown_episode_and_bad_url_are_clear_errors(store: ExperienceStore) -> None:
    with pytest.raises(NotFoundError, match="not in the store"):
        store.load_episode(uuid.uuid4())
    with pytest.raises(ValueError, match="store url"):
        ExperienceStore("mysql://localhost/x")
