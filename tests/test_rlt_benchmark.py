"""``benchmarks/rlt_sample_efficiency.py`` (issue 19 item 4): priors with a systematic error, the hand-off at the
grasp approach, the RLPD-style arm, the per-seed result files and the MLflow record of a run."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from envs.experts import bias_vectors, prior_bias_direction
from envs.scripted import ScriptedPolicy
from policies.base import stack_observations

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("rlt_sample_efficiency")


def test_prior_bias_goes_where_the_task_names_it_and_the_goal_bias_stays_an_x_shift():
    config = bench.BenchmarkConfig(task="pick-place-v3", prior_bias=0.015)
    assert bench.make_prior(config, 0).policy.biases == {"object_bias": (0.0, 0.015, 0.0), "goal_bias": None}
    assert bias_vectors("goal:-y", 0.01) == {"goal_bias": (0.0, -0.01, 0.0)}
    assert prior_bias_direction("reach-v3") == "goal:+x" and prior_bias_direction("push-v3") == "object:+x"
    with pytest.raises(ValueError, match="prior bias"):
        bias_vectors("hand:+x", 0.01)
    # --prior-goal-bias (the reach-v3 goal-biased runs): the prior sees the goal 8 mm further along x, as before
    reach = bench.BenchmarkConfig(task="reach-v3", prior_goal_bias=0.008, prior_noise=0.0, chunk_size=1)
    observation = bench.make_env(reach).reset(seed=5)[0]
    shifted = dict(observation, privileged=observation["privileged"].copy())
    shifted["privileged"][36] += 0.008
    chunk = bench.make_prior(reach, 0).policy.infer(stack_observations([observation])).actions
    expected = ScriptedPolicy("reach-v3").infer(stack_observations([shifted])).actions
    assert np.array_equal(chunk, expected)


def test_precision_handoff_fires_in_every_biased_rollout_within_a_chunk_of_the_grasp_approach():
    config = bench.BenchmarkConfig(task="pick-place-v3", prior_bias=0.015, episode_steps=150)
    check = bench.handoff_check(config, episodes=3)
    assert check["fired"] == 3
    assert abs(check["median_lag"]) <= config.chunk_size


def test_rlpd_arm_draws_half_of_each_batch_from_the_demos_with_a_layernorm_ensemble():
    config = bench.BenchmarkConfig(
        task="pick-place-v3", env_steps=250, episode_steps=100, demos=2, rlpd_utd=1, eval_episodes=1
    )
    model = bench.make_rlpd(config, 0)
    buffer = model.replay_buffer
    demo_rows = buffer.demos.size()
    assert buffer.demos.rewards[:demo_rows].sum() == 2 and buffer.demos.dones[:demo_rows].sum() == 2

    critic, target = model.policy.critic, model.policy.critic_target
    assert len(critic.q_networks) == 10
    assert all(any(isinstance(layer, torch.nn.LayerNorm) for layer in member) for member in critic.q_networks)
    states, actions = torch.zeros(5, 39), torch.zeros(5, 4)
    assert len(critic(states, actions)) == 10 and len(target(states, actions)) == 2
    assert all(value.shape == (5, 1) for value in target(states, actions))

    model.learn(250)  # 150 updates after SB3's 100 learning_starts
    assert buffer.sampled_rows > 0 and buffer.sampled_demo_rows / buffer.sampled_rows == 0.5
    demo_states = buffer.demos.observations[:demo_rows, 0]
    batch = buffer.sample(256).observations.numpy()
    from_demos = [bool((row == demo_states).all(axis=1).any()) for row in batch]
    assert from_demos == [False] * 128 + [True] * 128


def test_the_serl_recipe_drops_the_entropy_bonus_from_the_target_and_climbs_the_ensemble_mean():
    """``rlpd_recipe`` ``serl``: the actor's own actions (they carry a gradient) get the members' mean alone, so
    SAC's min over what the critic returns is that mean, while replayed actions and the target get every member;
    log-probabilities outside autograd (SAC's target) are zero, with gradients (actor and temperature) they are
    not; temperature from 0.01, γ 0.97. The default keeps SB3's SAC."""
    serl = bench.make_rlpd(bench.BenchmarkConfig(task="reach-v3", rlpd_critics=5, rlpd_recipe="serl", demos=1), 0)
    critic, states, replayed = serl.policy.critic, torch.randn(6, 39), torch.randn(6, 4)
    members = critic(states, replayed)
    assert len(members) == 5
    [mean] = critic(states, replayed.clone().requires_grad_(True))
    torch.testing.assert_close(mean, torch.stack(members).mean(dim=0))
    _, log_prob = serl.policy.actor.action_log_prob(states)
    with torch.no_grad():
        _, target_log_prob = serl.policy.actor.action_log_prob(states)
    assert bool((log_prob != 0).all()) and bool((target_log_prob == 0).all())
    assert serl.gamma == 0.97 and float(torch.exp(serl.log_ent_coef)) == pytest.approx(0.01)
    sb3 = bench.make_rlpd(bench.BenchmarkConfig(task="reach-v3", rlpd_critics=5, demos=1), 0)
    assert len(sb3.policy.critic(states, replayed.clone().requires_grad_(True))) == 5  # SAC's min over all
    with torch.no_grad():
        assert bool((sb3.policy.actor.action_log_prob(states)[1] != 0).all())  # SB3's soft target
    assert sb3.gamma == 0.99 and float(torch.exp(sb3.log_ent_coef)) == pytest.approx(1.0)
    defaults = bench.BenchmarkConfig()
    assert "rlpd_recipe" not in bench.arm_settings(defaults, "rlt")
    assert "rlpd_recipe" in bench.arm_settings(defaults, "rlpd")  # it keys only the RLPD arm's files


def test_the_run_logs_its_plot_summary_and_per_seed_curves_to_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow 3 refuses new file stores; artifacts go beside it
    config = bench.BenchmarkConfig(
        task="pick-place-v3",
        seeds=(0, 1),
        arms=("prior",),
        eval_episodes=2,
        episode_steps=60,
        output=str(tmp_path / "results"),
        mlflow_uri=uri,
    )
    bench.main(config)
    curve = bench.curve_path(config, "prior", 1)
    assert json.loads(curve.read_text())["curve"]["seed"] == 1
    client = MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("flywheel/rlt_sample_efficiency").experiment_id]
    )
    names = {item.path for item in client.list_artifacts(run.info.run_id)}
    stem = "rlt_sample_efficiency_pick-place-v3"
    assert {f"{stem}.json", f"{stem}.png", "curves"} <= names
    curves = {Path(item.path).name for item in client.list_artifacts(run.info.run_id, "curves")}
    assert curves == {"prior_seed0.json", "prior_seed1.json"}
    assert run.data.params["task"] == "pick-place-v3" and "final_success.prior" in run.data.metrics


def test_a_result_file_is_reused_across_settings_added_after_it_at_their_default(tmp_path, monkeypatch):
    """``run_cached`` (and the positive control's ``run_arm``) reuse a complete result file with the same
    settings; one written before a setting existed counts as run with that setting's default, not another value.
    A partial file, one with other settings or one with a setting that no longer exists is run again."""
    config = bench.BenchmarkConfig(task="reach-v3", arms=("prior",), output=str(tmp_path), eval_episodes=3)
    ran: list[int] = []

    def prior_arm(config: bench.BenchmarkConfig, seed: int) -> bench.Curve:
        ran.append(seed)
        return bench.Curve("prior", seed, [0, 10], [0.25, 0.5])

    monkeypatch.setitem(bench.ARMS, "prior", prior_arm)
    first = bench.run_cached(config, "prior", 0)
    assert bench.run_cached(config, "prior", 0) == first and ran == [0]
    path = bench.curve_path(config, "prior", 0)
    assert path == bench.curve_path(bench.replace(config, beta=2.0), "prior", 0)  # a learner setting
    assert path != bench.curve_path(bench.replace(config, prior_noise=0.1), "prior", 0)
    older = json.loads(path.read_text())
    del older["config"]["prior_bias_at"]  # as written before --prior-bias-at existed
    path.write_text(json.dumps(older))
    settings, defaults = bench.arm_settings(config, "prior"), bench.asdict(bench.BenchmarkConfig())
    assert bench.load_result(path, settings, defaults) == first
    assert bench.load_result(path, settings | {"prior_bias_at": "goal:-y"}, defaults) is None
    assert bench.load_result(path, settings | {"eval_episodes": 4}, defaults) is None
    del settings["chunk_size"]  # a setting that is gone: the file ran with something this run cannot know
    assert bench.load_result(path, settings, defaults) is None
    bench.write_result(path, bench.arm_settings(config, "prior"), first, complete=False)
    assert bench.load_result(path, bench.arm_settings(config, "prior"), defaults) is None
    assert bench.run_cached(config, "prior", 0).success == first.success and ran == [0, 0]  # run again


RECIPE = Path(__file__).resolve().parents[1] / "configs" / "rlt-recipe.yaml"
WINNING_RUN = "rlt_positive_control_pick-place-v3_rlt_s1_b4_ar0.8_0.1_ln_n3_demo0.5_seed{}.json"


def test_the_shipped_recipe_is_the_learner_that_passed_the_positive_control():
    """``configs/rlt-recipe.yaml`` holds exactly the settings of the positive-control runs that reached ≥ 0.9
    (the result files under ``benchmarks/results``), so the recipe cannot drift from its evidence."""
    recipe = bench.read_recipe(RECIPE, None)
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    for seed in (0, 1, 2):
        saved = json.loads((results / WINNING_RUN.format(seed)).read_text())
        assert (
            saved["complete"]
            and saved["curve"]["success"][-1] >= 0.9
            and saved["curve"]["steps"][-1] <= 150_000
        )
        for block in ("online", "learner"):
            for key, value in recipe[block].items():
                expected = "residual" if key == "beta_on" else saved["config"][key]  # the control forces it
                assert value == expected, (block, key)


def test_the_recipe_sets_the_learner_arms_and_each_arm_keeps_what_defines_it():
    recipe = bench.read_recipe(RECIPE, ["learner.critic_layer_norm=false", "online.total_env_steps=5"])
    assert recipe["learner"]["critic_layer_norm"] is False and recipe["learner"]["n_step"] == 3
    config = bench.BenchmarkConfig(task="pick-place-v3", recipe=recipe, beta=1.0, env_steps=300)
    rlt = bench.rlt_learner(config, 3)
    assert (rlt.residual_scale, rlt.beta, rlt.beta_on, rlt.utd_ratio, rlt.seed) == (
        1.0,
        4.0,
        "residual",
        10,
        3,
    )
    online = config.online("rlt", 3, exploration_noise=0.2)
    assert (online.exploration, online.exploration_rho, online.exploration_noise) == ("offset", 0.8, 0.1)
    assert online.total_env_steps == 300  # the benchmark owns the budget
    regression = bench.make_loop(config, 0, "regression", bench.rlt_learner(config, 0, q_weight=0.0))
    assert regression.rlt.token is not None and regression.rlt.config.state_key == "state"
    residual = bench.make_loop(config, 0, "residual", rlt, raw_state=True)
    assert residual.rlt.token is None and residual.rlt.config.state_key == "privileged"
    assert residual.rlt.proprio_dim == 39
    # without the recipe RLT has the learner defaults; the prior arm does not depend on the recipe
    plain = bench.replace(config, recipe={})
    assert bench.rlt_learner(plain, 0).residual_scale is None
    assert bench.curve_path(plain, "rlt", 0) != bench.curve_path(config, "rlt", 0)
    assert bench.curve_path(plain, "prior", 0) == bench.curve_path(config, "prior", 0)
    with pytest.raises(bench.UserError, match=r"learner\.no_such_key"):
        bench.read_recipe(RECIPE, ["learner.no_such_key=1"])


def test_a_learner_arm_writes_its_curve_as_it_lands_with_the_demos_in_its_second_replay(
    tmp_path, monkeypatch
):
    """A learner arm's result file exists (incomplete) after its first evaluation point, and the regression arm
    (q_weight 0, no residual, 50% reference dropout) samples the demos beside online data."""
    config = bench.BenchmarkConfig(
        task="pick-place-v3",
        recipe={"learner": {"demo_fraction": 0.5, "critic_warmup_updates": 10}},
        prior_bias=0.015,
        precision_handoff=True,
        env_steps=200,
        eval_every=100,
        eval_episodes=1,
        episode_steps=60,
        warmup_episodes=1,
        token_steps=5,
        demos=1,
        output=str(tmp_path),
    )
    seen: list[dict] = []
    write = bench.write_result

    def spy(path: Path, settings: dict, curve: bench.Curve, complete: bool = True, extra: dict | None = None):
        seen.append({"complete": complete, "points": len(curve.steps), "training": bool(extra)})
        write(path, settings, curve, complete, extra)

    monkeypatch.setattr(bench, "write_result", spy)
    made = []
    make_loop = bench.make_loop
    monkeypatch.setattr(bench, "make_loop", lambda *a, **k: made.append(make_loop(*a, **k)) or made[-1])
    curve = bench.run_cached(config, "regression", 0)
    assert [entry["complete"] for entry in seen] == [False] * (len(seen) - 1) + [True] and len(seen) >= 2
    assert seen[0]["points"] == 1 and seen[-1]["points"] == len(curve.steps) >= 3
    saved = json.loads(bench.curve_path(config, "regression", 0).read_text())
    assert saved["complete"] and saved["training"] and saved["training"][0]["episodes"] >= 1
    learner_episodes = sum(stats.mode == "learner" for stats in made[0].stats)
    assert (
        sum(window["episodes"] for window in saved["training"]) == learner_episodes
    )  # every one, the last too
    learner = made[0].rlt.learner
    assert learner.config.q_weight == 0.0 and learner.config.residual_scale is None
    assert learner.config.ref_dropout == 0.5 and learner.demo_buffer.size() > 0


def test_the_known_answer_arm_plays_the_biased_prior_until_the_handoff_and_the_clean_expert_after():
    config = bench.BenchmarkConfig(
        task="pick-place-v3", prior_bias=0.015, prior_noise=0.0, precision_handoff=True, episode_steps=120
    )
    oracle, env = bench.UnbiasedAfterHandoff(config, 0), bench.make_env(config)
    biased, clean = bench.make_prior(config, 0), bench.make_prior(bench.replace(config, prior_bias=0.0), 0)
    switch, sources, differs = bench.make_switch(config), [], set()
    oracle.reset()
    observation, _ = env.reset(seed=bench.eval_seeds(config)[0])
    for _ in range(10):
        batch = stack_observations([observation])
        critical = switch.is_critical(observation, {}) or bool(sources and sources[-1] == "clean")
        chunk = oracle.infer(batch).actions[0]
        expected = (clean if critical else biased).infer(batch).actions[0]
        other = (biased if critical else clean).infer(batch).actions[0]
        assert np.array_equal(chunk, expected)
        sources.append("clean" if critical else "biased")
        if not np.array_equal(chunk, other):
            differs.add(sources[-1])
        for action in chunk:
            observation = env.step(action)[0]
    assert sources[0] == "biased" and "clean" in sources  # the hand-off fired within 100 steps
    assert differs == {"biased", "clean"}  # the bias changes the chunks on both sides of the hand-off
    assert bench.arm_settings(config, "oracle")["precision_handoff"] is True


def test_summarize_reads_the_files_that_exist_finished_or_not_and_runs_nothing(tmp_path, monkeypatch):
    config = bench.BenchmarkConfig(
        task="reach-v3", arms=("prior", "rlt"), seeds=(0, 1), output=str(tmp_path), tag="claim"
    )
    settings = bench.arm_settings(config, "rlt")
    bench.write_result(
        bench.curve_path(config, "rlt", 0), settings, bench.Curve("rlt", 0, [5, 15], [0.2, 0.6])
    )
    running = bench.Curve("rlt", 1, [5], [0.4])
    bench.write_result(bench.curve_path(config, "rlt", 1), settings, running, complete=False)
    monkeypatch.setitem(bench.ARMS, "prior", lambda *_: pytest.fail("summarize must not run an arm"))
    result = bench.main(config, summarize_only=True)
    assert [(c["arm"], c["seed"]) for c in result["curves"]] == [("rlt", 0), ("rlt", 1)]
    rlt = result["summary"]["rlt"]  # the unfinished seed counts up to its last point
    assert rlt["mean"] == pytest.approx([0.3, 0.6]) and rlt["seeds_at"] == [2, 1] and rlt["seeds"] == 2
    assert (tmp_path / "rlt_sample_efficiency_reach-v3_claim.png").exists()


def test_a_run_of_one_arm_and_seed_summarizes_every_file_its_settings_have(tmp_path, monkeypatch):
    """Seeds accumulate over several runs: running one arm and seed rewrites the summary with the other arms' and
    seeds' files too (a run once overwrote it with just its own)."""
    config = bench.BenchmarkConfig(
        task="reach-v3", arms=("prior",), seeds=(2,), output=str(tmp_path), tag="claim"
    )
    for seed, success in ((0, [0.2, 0.6]), (1, [0.4, 0.8])):
        bench.write_result(
            bench.curve_path(config, "rlt", seed),
            bench.arm_settings(config, "rlt"),
            bench.Curve("rlt", seed, [5, 15], success),
        )
    monkeypatch.setitem(bench.ARMS, "prior", lambda _, seed: bench.Curve("prior", seed, [0, 15], [0.3, 0.3]))
    result = bench.main(config)
    assert [(c["arm"], c["seed"]) for c in result["curves"]] == [("prior", 2), ("rlt", 0), ("rlt", 1)]
    assert result["summary"]["rlt"]["mean"] == pytest.approx([0.3, 0.7])
    assert result["config"]["arms"] == ("prior", "rlt") and result["config"]["seeds"] == (0, 1, 2)
    saved = json.loads((tmp_path / "rlt_sample_efficiency_reach-v3_claim.json").read_text())
    assert json.dumps(saved["summary"]) == json.dumps(result["summary"])  # the file holds every arm (nan ≠ nan)


def test_sac_writes_its_curve_at_every_point_with_the_exploring_episodes(tmp_path, monkeypatch):
    """SAC from scratch (and so the RLPD-style arm, which learns through the same callback) rewrites its result
    file at every evaluation point, with training windows counting every finished exploring episode."""
    config = bench.BenchmarkConfig(
        task="reach-v3",
        env_steps=300,
        eval_every=100,
        eval_episodes=1,
        episode_steps=50,
        output=str(tmp_path),
    )
    seen: list[tuple[bool, int, list[dict]]] = []
    write = bench.write_result

    def spy(path: Path, settings: dict, curve: bench.Curve, complete: bool = True, extra: dict | None = None):
        seen.append((complete, len(curve.steps), (extra or {}).get("training", [])))
        write(path, settings, curve, complete, extra)

    monkeypatch.setattr(bench, "write_result", spy)
    curve = bench.run_cached(config, "sac", 0)
    assert curve.steps == [0, 100, 200, 300]
    expected = [(False, points) for points in (1, 2, 3, 4)]
    assert [(complete, points) for complete, points, _ in seen] == [*expected, (True, 4)]
    assert (
        sum(window["episodes"] for window in seen[-1][2]) == 300 // 50
    )  # reach never succeeds by chance here
    saved = json.loads(bench.curve_path(config, "sac", 0).read_text())
    assert saved["complete"] and saved["curve"]["steps"] == [0, 100, 200, 300]


def _curve(arm: str, seed: int, steps: list[int], success: list[float]) -> bench.Curve:
    return bench.Curve(arm, seed, steps, success)


def test_targets_judge_the_mean_of_the_last_two_points_and_paired_gaps_by_seed():
    steps = [3_000, 13_000, 23_000]
    curves = [
        _curve("rlt", 0, steps, [0.3, 0.9, 0.8]),  # final 0.85
        _curve("rlt", 1, steps, [0.4, 0.8, 1.0]),  # final 0.90
        _curve("prior", 0, [0], [0.4]),
        _curve("prior", 1, [0], [0.3]),
        _curve("regression", 0, steps, [0.0, 0.5, 0.3]),  # final 0.40
        _curve("regression", 1, steps, [0.0, 0.4, 0.4]),  # final 0.40
        _curve("rlpd", 0, [0, 10_000, 20_000], [0.0, 0.5, 0.9]),
        _curve("rlpd", 1, [0, 10_000, 20_000], [0.0, 0.7, 0.9]),
        _curve("sac", 0, [0, 10_000, 20_000], [0.0, 0.0, 0.0]),
    ]
    verdict = bench.targets(curves, bench.summarize(curves))

    assert verdict["rlt_final"] == pytest.approx(0.875) and verdict["rlt_seeds"] == 2
    assert verdict["rlt_final_ci95"] == pytest.approx(
        12.706 * np.std([0.85, 0.90], ddof=1) / np.sqrt(2), rel=1e-3
    )
    assert verdict["rlt_at_least_0.85"]
    prior_gap = verdict["rlt_minus_prior"]  # 0.45 and 0.60
    assert prior_gap["mean"] == pytest.approx(0.525) and prior_gap["seeds"] == 2
    assert verdict["rlt_0.30_above_prior"] and verdict["rlt_0.30_above_regression"]
    assert verdict["rlt_minus_regression"]["mean"] == pytest.approx(0.475)
    # mean curves: RLT 0.35 / 0.85 / 0.90 at 3k / 13k / 23k, RLPD 0 / 0.6 / 0.9 at 0 / 10k / 20k
    assert verdict["vs_rlpd"]["rlt_steps"] == 13_000 and verdict["vs_rlpd"]["rlpd_steps"] == 20_000
    assert verdict["fewer_steps_than_rlpd"]
    # the prior's level (0.35) RLT reaches at its first point; SAC never, so 20k / 3k is a lower bound
    vs_sac = verdict["vs_sac"]
    assert (
        vs_sac["level"] == pytest.approx(0.35)
        and vs_sac["rlt_steps"] == 3_000
        and vs_sac["sac_steps"] is None
    )
    assert vs_sac["ratio"] == pytest.approx(20_000 / 3_000) and vs_sac["ratio_is_lower_bound"]
    assert not verdict["at_least_10x_fewer_steps_than_sac"]


def test_the_rlpd_arms_settings_key_only_its_own_result_files(tmp_path):
    """Running the RLPD-style arm at other ensemble settings leaves the learner arms' files where they were."""
    base = bench.BenchmarkConfig(task="reach-v3", output=str(tmp_path))
    other = bench.replace(base, rlpd_critics=5, rlpd_utd=2)
    for arm in ("rlt", "regression", "residual", "prior", "sac"):
        assert bench.curve_path(other, arm, 0) == bench.curve_path(base, arm, 0)
    assert bench.curve_path(other, "rlpd", 0) != bench.curve_path(base, "rlpd", 0)
    assert bench.curve_path(bench.replace(base, demos=3), "rlt", 0) != bench.curve_path(base, "rlt", 0)
    saved = {
        "config": bench.asdict(base),
        "complete": True,
        "curve": bench.asdict(bench.Curve("rlt", 0, [3], [0.5])),
    }
    path = bench.curve_path(base, "rlt", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(saved))  # a learner file written when it still recorded the RLPD settings
    assert bench.run_cached(other, "rlt", 0).success == [0.5]
