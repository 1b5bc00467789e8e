"""Known-bad data: the bad-segment wrapper (deterministic, ground truth exactly where the action was overridden),
the phase-gated simulated human, and the ground-truth column through ``flywheel collect`` on both backends."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from core.types import StepSource
from envs import (
    EnvConfig,
    GymEnvConfig,
    InjectionConfig,
    ScriptedExpert,
    SimulatedHumanConfig,
    goal_distance,
    make_env,
)
from experiments.cli import app
from experiments.pipeline_config import PipelineConfigError, parse_pipeline_config
from storage import ExperienceStore
from tests.storage_fixtures import pg_database, store_url  # noqa: F401

POLICY_ACTION = np.array([0.3, -0.2, 0.1, 0.5], dtype=np.float32)
ALL_KINDS = ("detour", "random", "pause")


def reach(steps: int = 80) -> EnvConfig:
    return EnvConfig(task="reach-v3", render=False, max_episode_steps=steps, terminate_on_success=False)


def rollout(env, seed: int, policy=lambda obs: POLICY_ACTION) -> list[dict]:
    """One episode; per step the observation it started from and the step's info."""
    obs, _ = env.reset(seed=seed)
    steps = []
    while True:
        before = obs
        obs, _, terminated, truncated, info = env.step(policy(obs))
        steps.append({"obs": before, **info})
        if terminated or truncated:
            return steps


def test_injection_is_deterministic_under_a_seed_and_varies_with_it():
    config = InjectionConfig(kinds=ALL_KINDS, rate=0.1, length=5, seed=3)
    env = make_env(reach(), inject=config)
    first, again = rollout(env, seed=1), rollout(env, seed=1)
    other = rollout(env, seed=2)
    assert [s["injected"] for s in first] == [s["injected"] for s in again]
    np.testing.assert_array_equal(
        np.stack([s["executed_action"] for s in first]), np.stack([s["executed_action"] for s in again])
    )
    assert [s["injected"] for s in first] != [s["injected"] for s in other]
    env.close()


def test_ground_truth_is_exactly_where_the_action_was_overridden():
    env = make_env(
        reach(120), inject=InjectionConfig(kinds=ALL_KINDS, rate=0.08, length=6, scale=0.8, seed=0)
    )
    steps = [s for seed in range(3) for s in rollout(env, seed)]
    env.close()
    kinds = {s["injected"] for s in steps}
    assert kinds == {None, *ALL_KINDS}
    for step in steps:
        executed, proposed = step["executed_action"], step["policy_action"]
        np.testing.assert_array_equal(proposed, POLICY_ACTION)
        if step["injected"] is None:
            np.testing.assert_array_equal(executed, POLICY_ACTION)
            continue
        assert executed[3] == POLICY_ACTION[3]  # the gripper stays the policy's
        move = executed[:3]
        if step["injected"] == "pause":
            np.testing.assert_array_equal(move, 0.0)
        else:
            assert np.linalg.norm(move) == pytest.approx(0.8, abs=1e-5)
        if step["injected"] == "detour":
            privileged = step["obs"]["privileged"]
            away = privileged[0:3] - privileged[36:39]
            assert float(move @ away) == pytest.approx(0.8 * np.linalg.norm(away), rel=1e-4)


def test_segments_last_the_configured_length_at_the_configured_rate():
    env = make_env(reach(150), inject=InjectionConfig(kinds=("pause",), rate=0.05, length=7, seed=1))
    runs, injected, total = [], 0, 0
    for seed in range(4):
        flags = [s["injected"] is not None for s in rollout(env, seed)]
        injected, total = injected + sum(flags), total + len(flags)
        starts = [t for t, flag in enumerate(flags) if flag and (t == 0 or not flags[t - 1])]
        for start in starts:
            end = next((t for t in range(start, len(flags)) if not flags[t]), None)
            if end is not None:  # a run the episode's end cut short is left out
                runs.append(end - start)
    env.close()
    assert runs and all(run % 7 == 0 for run in runs)  # back-to-back segments merge into multiples of 7
    expected = 0.05 * 7 / (1 + 0.05 * 7)
    assert abs(injected / total - expected) < 0.12


def test_the_human_is_never_injected_and_ends_the_segment():
    human = SimulatedHumanConfig(no_progress_steps=None, random_rate=0.05, takeover_steps=5, seed=0)
    env = make_env(reach(), human=human, inject=InjectionConfig(kinds=("detour",), rate=0.1, length=8))
    steps = [s for seed in range(2) for s in rollout(env, seed)]
    env.close()
    human_steps = [s for s in steps if s["source"] == StepSource.HUMAN]
    assert human_steps and any(s["injected"] for s in steps)
    assert all(s["injected"] is None for s in human_steps)


def test_detours_need_a_goal_and_kinds_are_validated():
    with pytest.raises(ValidationError, match="distinct"):
        InjectionConfig(kinds=("pause", "pause"))
    with pytest.raises(ValidationError):
        InjectionConfig(kinds=("teleport",))
    pendulum = GymEnvConfig(env_id="Pendulum-v1", max_episode_steps=30)
    with pytest.raises(ValueError, match="detour"):
        make_env(pendulum, inject=InjectionConfig(kinds=("detour",)))
    env = make_env(pendulum, inject=InjectionConfig(kinds=("random", "pause"), rate=0.2, length=3))
    steps = rollout(env, 0, lambda obs: np.array([1.5], dtype=np.float32))
    env.close()
    for step in steps:  # generic envs: every action dimension moves, inside the box
        if step["injected"] is None:
            assert step["executed_action"][0] == 1.5
        else:
            assert -2.0 <= step["executed_action"][0] <= 2.0 and step["executed_action"][0] != 1.5
    assert {s["injected"] for s in steps} == {None, "random", "pause"}


def _stall_near_goal(radius: float):
    """A policy that reaches toward the goal and freezes once within ``radius`` of it."""
    expert = ScriptedExpert("reach-v3")

    def policy(obs):
        if goal_distance("reach-v3", obs["privileged"]) <= radius:
            return np.zeros(4, dtype=np.float32)
        return expert.clean_action(obs["privileged"])

    return policy


def test_phase_gated_human_takes_over_only_late():
    """Ungated, the human corrects the far-from-goal stall; gated by distance it waits for the near-goal stall."""
    stall = 10

    def far_stall(obs):  # the policy never moves: it stalls far from the goal
        return np.zeros(4, dtype=np.float32)

    ungated = SimulatedHumanConfig(no_progress_steps=stall, takeover_steps=5)
    steps = rollout(make_env(reach(60), human=ungated), 0, far_stall)
    assert any(s["source"] == StepSource.HUMAN for s in steps)
    gated = ungated.model_copy(update={"late_distance": 0.1})
    steps = rollout(make_env(reach(60), human=gated), 0, far_stall)
    assert all(
        s["source"] == StepSource.POLICY for s in steps
    )  # the stall is far from the goal: nobody comes
    steps = rollout(make_env(reach(150), human=gated), 0, _stall_near_goal(0.08))
    first = next(t for t, s in enumerate(steps) if s["source"] == StepSource.HUMAN)
    assert all(
        goal_distance("reach-v3", s["obs"]["privileged"]) <= 0.1 for s in steps[first - stall + 1 : first + 1]
    )
    assert goal_distance("reach-v3", steps[0]["obs"]["privileged"]) > 0.1  # the early phase is autonomous


def test_step_gated_human_waits_for_its_step():
    human = SimulatedHumanConfig(
        no_progress_steps=None, random_rate=0.5, takeover_steps=3, late_after_step=25
    )
    steps = rollout(make_env(reach(60), human=human), 0)
    sources = [s["source"] for s in steps]
    assert set(sources[:25]) == {StepSource.POLICY} and StepSource.HUMAN in sources[25:]


def test_flywheel_collect_stores_the_ground_truth(store_url, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    args = [
        "collect",
        "--task",
        "reach-v3",
        "--episodes",
        "2",
        "--noise",
        "0.1",
        "--no-images",
        "--seed",
        "4",
    ]
    args += ["--inject", "detour,pause", "--inject-rate", "0.1", "--inject-length", "5", "--run-id", "gt"]
    result = CliRunner().invoke(app, [*args, "--db", store_url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    store = ExperienceStore(store_url)
    records = [store.load_episode(s.uuid, images=False) for s in store.list_episodes(run_id="gt")]
    assert len(records) == 2
    kinds = [kind for record in records for kind in (record.injected or [None] * record.length)]
    assert {"detour", "pause"} <= set(kinds) and None in kinds
    for record in records:
        for t, kind in enumerate(record.injected or []):
            if kind == "pause":
                np.testing.assert_array_equal(record.actions[t, :3], 0.0)
    fractions = store.injected_fractions(run_id="gt")
    assert fractions == {r.uuid: sum(k is not None for k in (r.injected or [])) / r.length for r in records}


def test_the_pipeline_config_takes_injection_and_a_late_human():
    config = parse_pipeline_config(
        {
            "name": "late",
            "tasks": ["reach-v3"],
            "injection": {"kinds": ["detour", "pause"], "rate": 0.05, "length": 10},
            "interventions": {"late_distance": 0.05, "no_progress_steps": 10},
        }
    )
    assert config.injection == InjectionConfig(kinds=("detour", "pause"), rate=0.05, length=10)
    assert config.interventions.late_distance == 0.05
    with pytest.raises(PipelineConfigError, match=r"injection\.kinds"):
        parse_pipeline_config({"name": "bad", "tasks": ["reach-v3"], "injection": {"kinds": ["teleport"]}})


def test_an_unknown_injection_kind_is_a_one_line_cli_error(tmp_path):
    args = [
        "collect",
        "--task",
        "reach-v3",
        "--inject",
        "detour,teleport",
        "--db",
        f"sqlite:///{tmp_path / 's.db'}",
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "inject.kinds.1" in result.output and "detour" in result.output
