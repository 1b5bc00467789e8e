"""``flywheel db`` and ``flywheel episodes`` against a real store on both backends."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from envs import ScriptedExpert
from experiments.cli import app
from experiments.commands import collect as collect_commands
from storage import ExperienceStore, InterventionSegment, Outcome, StepSource
from tests import storage_fixtures
from tests.storage_fixtures import POLICY_VERSION, make_episode

store_url, pg_database = storage_fixtures.store_url, storage_fixtures.pg_database
runner = CliRunner()


def test_db_upgrade_stats_and_episode_browsing(store_url: str) -> None:
    result = runner.invoke(app, ["db", "stats", "--db", store_url])
    assert result.exit_code == 2 and "flywheel db upgrade" in result.output
    result = runner.invoke(app, ["db", "upgrade", "--db", store_url])
    assert result.exit_code == 0, result.output
    assert "upgraded from empty to revision" in result.output
    assert "already at" in runner.invoke(app, ["db", "upgrade", "--db", store_url]).output

    store = ExperienceStore(store_url)
    store.register_policy_version(POLICY_VERSION, kind="vla")
    rng = np.random.default_rng(0)
    records = [make_episode(rng, 12, outcome=o) for o in (Outcome.SUCCESS, Outcome.FAILURE, Outcome.SUCCESS)]
    for record in records:
        store.write_episode(record)

    stats = json.loads(runner.invoke(app, ["db", "stats", "--db", store_url, "--json"]).output)
    assert stats["episodes"] == 3 and stats["steps"] == 36
    assert stats["episodes_by_task"] == {"pick-place-v3": {"failure": 1, "success": 2}}
    table = runner.invoke(app, ["db", "stats", "--db", store_url])
    assert table.exit_code == 0 and "pick-place-v3" in table.output

    listing = runner.invoke(
        app, ["episodes", "list", "--db", store_url, "--outcome", "success", "--limit", "1"]
    )
    assert listing.exit_code == 0, listing.output
    assert "1 of 2 episodes" in listing.output and str(records[2].uuid) in listing.output
    assert str(records[0].uuid) not in listing.output
    bad = runner.invoke(app, ["episodes", "list", "--db", store_url, "--outcome", "won"])
    assert bad.exit_code == 2 and "outcome" in bad.output

    shown = runner.invoke(app, ["episodes", "show", str(records[1].uuid), "--db", store_url])
    assert shown.exit_code == 0, shown.output
    for text in ("failure", "no_progress", "corner 16×16", "human steps", "39-D"):
        assert text in shown.output
    missing = runner.invoke(
        app, ["episodes", "show", "00000000-0000-4000-8000-000000000000", "--db", store_url]
    )
    assert missing.exit_code == 2 and "not in the store" in missing.output
    store.close()


def human_runs(sources: np.ndarray) -> list[tuple[int, int]]:
    """``(t_start, t_end)`` of each maximal run of human steps (``t_end`` exclusive)."""
    human = np.concatenate([[0], (sources == StepSource.HUMAN).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(human))
    return [(int(start), int(end)) for start, end in zip(edges[::2], edges[1::2], strict=True)]


def test_collect_with_simulated_interventions_stores_consistent_provenance(store_url: str) -> None:
    args = ["--task", "reach-v3", "--policy", "scripted", "--noise", "0.5", "--episodes", "2", "--no-images"]
    args += ["--interventions", "--deviation-threshold", "0.8", "--human-noise", "0.3"]
    args += ["--no-progress-steps", "1000", "--takeover-steps", "10", "--db", store_url]
    result = runner.invoke(collect_commands.app, args)
    assert result.exit_code == 0, result.output
    store = ExperienceStore(store_url)
    records = [store.load_episode(summary.uuid) for summary in store.list_episodes()]
    store.close()
    assert len(records) == 2
    human_steps = sum(int((record.sources == StepSource.HUMAN).sum()) for record in records)
    assert human_steps > 0 and f"human steps {human_steps}" in " ".join(result.output.split())
    for record in records:
        assert record.interventions == [
            InterventionSegment(start, end, "deviation") for start, end in human_runs(record.sources)
        ]
        human = record.sources == StepSource.HUMAN
        assert all(record.policy_versions[t] is None for t in np.flatnonzero(human))
    human_actions = np.concatenate([r.actions[r.sources == StepSource.HUMAN] for r in records])
    human_states = np.concatenate([r.privileged[r.sources == StepSource.HUMAN] for r in records])
    expert = ScriptedExpert("reach-v3")
    clean = np.stack([expert.clean_action(state) for state in human_states])
    assert not np.allclose(human_actions, clean, atol=1e-3)  # the human acts with --human-noise
