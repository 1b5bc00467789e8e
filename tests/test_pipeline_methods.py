"""The pipeline's RLT methods on configs/tiny.yaml: ``both`` (RECAP then RLT around the RECAP candidate) for one
iteration on the real PostgreSQL server, and ``rlt`` (online RLT around the deployed policy) for two iterations
on SQLite, asserting on the store (stage records, episodes, relabel, versions and their lineage, evaluations),
MLflow (RL curves per eval point, registry) and resume after SIGKILL in the middle of the RLT stage.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from experiments.cli import app
from experiments.pipeline import STAGE_RECORD, Pipeline, stages_for
from experiments.pipeline_config import PipelineConfigError, load_pipeline_config, parse_pipeline_config
from experiments.pipeline_rlt import RLT_KIND
from rlt.actor import RLTActor
from rlt.config import LearnerConfig, RLTConfig
from storage.engine import create_scratch_database
from tests.test_pipeline import REPO, tiny_config
from tests.test_pipeline_resume import TIMEOUT, _finished, _kill_when, _start


def _iterate(config: Path) -> None:
    result = CliRunner().invoke(app, ["iterate", "--config", str(config), "--once", "--no-progress"])
    assert result.exit_code == 0, result.output


def _rlt_episode_ids(pipeline: Pipeline, iteration: int, count: int) -> set[uuid.UUID]:
    run = pipeline.rlt_run(iteration)
    return {uuid.uuid5(uuid.NAMESPACE_URL, f"{run}#{index}") for index in range(count)}


def _expected_rlt_episodes(pipeline: Pipeline, iteration: int) -> int:
    """Warm-up + online + evaluation episodes the RLT loop played (its stage record's count)."""
    [state] = [s for s in pipeline.iterations() if s.iteration == iteration]
    return int(state.outputs["rlt"].metrics["rl_episodes"])


def _assert_rl_curve_in_mlflow(pipeline: Pipeline, iteration: int) -> None:
    client = MlflowClient(pipeline.config.mlflow_uri)
    experiment = client.get_experiment_by_name(f"flywheel/{pipeline.config.name}")
    [run] = client.search_runs(
        [experiment.experiment_id],
        f"tags.`flywheel.stage` = 'rlt' and tags.`flywheel.iteration` = '{iteration}'",
    )
    curve = client.get_metric_history(run.info.run_id, "rl_eval_success_rate")
    settings = pipeline.config.rlt.online
    # one point per eval_every_steps of the online budget, plus the final one
    assert len(curve) >= settings.total_env_steps // settings.eval_every_steps
    assert sorted({point.step for point in curve}) == sorted(point.step for point in curve)
    assert all(0.0 <= point.value <= 1.0 for point in curve)
    [iteration_run] = client.search_runs(
        [experiment.experiment_id],
        f"tags.`flywheel.stage` = 'iteration' and tags.`flywheel.iteration` = '{iteration}'",
    )
    plots = {a.path for a in client.list_artifacts(iteration_run.info.run_id, "plots")}
    assert "plots/rl_curve.png" in plots


def test_method_config_errors():
    with pytest.raises(PipelineConfigError, match=r"method 'rlt' trains one RLT learner per pipeline"):
        parse_pipeline_config({"name": "x", "tasks": ["reach-v3", "push-v3"], "method": "rlt"})
    with pytest.raises(PipelineConfigError, match=r"rlt\.handoff: expected 'always' or a pair of"):
        parse_pipeline_config({"name": "x", "tasks": ["reach-v3"], "method": "rlt", "rlt": {"handoff": "x"}})
    assert load_pipeline_config(REPO / "configs" / "peg-rlt.yaml").rlt.handoff == "hand-object"
    assert stages_for("rlt") == ("rlt", "evaluate", "gate", "register", "deploy", "report")
    assert stages_for("both")[:4] == ("collect", "relabel", "train", "rlt")


def test_rlt_settings_are_the_learner_and_online_configs():
    """The pipeline's ``rlt:`` block is ``rlt.config.RLTConfig``: the learner's and the online loop's own
    models, their defaults, and a one-line error naming a field written in the layout before them."""
    raw = {"name": "x", "tasks": ["reach-v3"], "method": "rlt"}
    assert parse_pipeline_config(raw).rlt == RLTConfig()
    raw["rlt"] = {"learner": {"normalize_state": False, "beta": 0.5}, "online": {"exploration": "offset"}}
    settings = parse_pipeline_config(raw).rlt
    assert (settings.learner.normalize_state, settings.learner.beta) == (False, 0.5)
    assert settings.online.exploration == "offset" and settings.learner.utd_ratio == LearnerConfig().utd_ratio
    raw["rlt"] = {"beta": 0.5}
    with pytest.raises(PipelineConfigError, match=r"^config: rlt: beta: moved to learner.beta$"):
        parse_pipeline_config(raw)


def test_both_methods_one_iteration_on_postgresql(tmp_path, pg_url):
    """RECAP (collect, relabel, train) then RLT around the RECAP candidate, store on the PostgreSQL server."""
    store_url, drop = create_scratch_database(pg_url, prefix="flywheel_pipeline")
    try:
        config = tiny_config(tmp_path, method="both", store_url=store_url)
        _iterate(config)
        pipeline = Pipeline(load_pipeline_config(config), progress=False)
        store, settings = pipeline.store, pipeline.config
        assert store.url.startswith("postgresql")
        [state] = pipeline.iterations()
        assert state.finished and tuple(state.outputs) == stages_for("both")
        records = [r for r in store.list_runs(prefix=pipeline.prefix) if r["name"] == STAGE_RECORD]
        assert sorted(r["config"]["stage"] for r in records) == sorted(stages_for("both"))
        [collect_run] = state.outputs["collect"].runs.values()
        assert store.count_episodes(run_id=collect_run) == settings.collection.episodes_per_task
        relabel = store.load_relabel(state.outputs["relabel"].relabel_id)
        assert relabel.config["pipeline_stage"] == pipeline.stage_id(1, "relabel")
        assert len(relabel.labels) == settings.collection.episodes_per_task
        versions = {row["version"]: row for row in store.policy_versions()}
        recap, rlt = state.outputs["train"].version, state.outputs["rlt"].version
        assert versions[recap]["kind"] == "vla" and versions[recap]["parent"] == pipeline.prior_version()
        assert versions[rlt]["kind"] == RLT_KIND and versions[rlt]["parent"] == recap
        # the collected episodes (with their interventions) joined RLT's warm-up
        assert (
            state.outputs["rlt"].metrics["rl_warmup_stored_episodes"] == settings.collection.episodes_per_task
        )
        rlt_run = pipeline.rlt_run(1)
        count = store.count_episodes(run_id=rlt_run)
        assert count == _expected_rlt_episodes(pipeline, 1) > settings.rlt.online.warmup_episodes
        rlt_summaries = store.list_episodes(run_id=rlt_run)
        assert {s.uuid for s in rlt_summaries} == _rlt_episode_ids(pipeline, 1, count)
        steps = store.load_episode(rlt_summaries[-1].uuid, images=False).policy_versions
        assert rlt in steps  # the learner acted (hand-off 'always') and its steps name the RLT version
        assert state.outputs["evaluate"].versions == {
            "candidate": rlt,
            "deployed": pipeline.prior_version(),
        }
        assert [e.n for e in store.list_evaluations(policy_version=rlt)] == [settings.evaluation.episodes]
        client = MlflowClient(settings.mlflow_uri, registry_uri=settings.mlflow_uri)
        registered = client.get_model_version(
            pipeline.tracker.model_name, state.outputs["register"].model_version
        )
        assert registered.tags["store_version"] == rlt and registered.tags["policy_kind"] == RLT_KIND
        _assert_rl_curve_in_mlflow(pipeline, 1)
        store.close()
    finally:
        drop()


def test_rlt_resumes_after_sigkill_then_iterates_around_the_deployed_policy(tmp_path):
    """Iteration 1 is killed in the middle of its RLT stage and rerun (no duplicates); iteration 2 (gate
    'always') runs RLT around what iteration 1 deployed and deploys it."""
    config = tiny_config(tmp_path, method="rlt")
    pipeline = Pipeline(load_pipeline_config(config), progress=False)
    store, rlt_run = pipeline.store, pipeline.rlt_run(1)
    process = _start(config)
    _kill_when(process, lambda: store.count_episodes(run_id=rlt_run) >= 3)
    assert not _finished(store, pipeline, "rlt")()
    process = _start(config)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr.decode()[-3000:]
    [first] = pipeline.iterations()
    assert first.finished and tuple(first.outputs) == stages_for("rlt")
    count = store.count_episodes()
    assert count == store.count_episodes(run_id=rlt_run) == _expected_rlt_episodes(pipeline, 1)
    assert {s.uuid for s in store.list_episodes(run_id=rlt_run)} == _rlt_episode_ids(pipeline, 1, count)
    one = first.outputs["rlt"].version
    assert [r["version"] for r in store.policy_versions() if r["kind"] == RLT_KIND] == [one]
    client = MlflowClient(pipeline.config.mlflow_uri, registry_uri=pipeline.config.mlflow_uri)
    assert len(client.search_model_versions(f"name = '{pipeline.tracker.model_name}'")) == 1
    _assert_rl_curve_in_mlflow(pipeline, 1)

    _iterate(tiny_config(tmp_path, method="rlt", gate={"rule": "always"}))
    first, second = pipeline.iterations()
    two, deployed_after_first = second.outputs["rlt"].version, first.outputs["deploy"].deployed
    versions = {row["version"]: row for row in store.policy_versions()}
    assert versions[one]["parent"] == pipeline.prior_version() == first.outputs["rlt"].prior
    assert versions[two]["kind"] == RLT_KIND
    assert second.outputs["rlt"].prior == deployed_after_first == versions[two]["parent"]
    assert store.count_episodes(run_id=pipeline.rlt_run(2)) == _expected_rlt_episodes(pipeline, 2)
    assert store.count_episodes() == count + _expected_rlt_episodes(pipeline, 2)
    _assert_rl_curve_in_mlflow(pipeline, 2)
    assert second.outputs["gate"].promote and pipeline.deployed_version() == two
    assert pipeline.deploy_file().read_text().strip() == two
    deployed = pipeline._load(two, pipeline.config.tasks[0])
    assert isinstance(deployed, RLTActor)
    # nested when iteration 1 promoted its RLT policy, else around the scripted prior
    assert isinstance(deployed.prior, RLTActor) == (deployed_after_first == one)
