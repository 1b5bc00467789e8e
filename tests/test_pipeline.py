"""The improvement pipeline end to end on configs/tiny.yaml: two iterations through `flywheel iterate`,
asserting on the store (stage records, episodes, relabels, versions, evaluations), MLflow (runs, nested stage
runs, metrics, artifacts, registry, alias), the gate (a 10-step policy is rejected against a decent prior and
stays registered with the reason), the deploy file, and the MLflow dashboard over HTTP and in headless chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from experiments.cli import app
from experiments.gate import decide
from experiments.pipeline import STAGES, Pipeline
from experiments.pipeline_artifacts import VIDEO_SIDE
from experiments.pipeline_config import (
    GateSettings,
    PipelineConfigError,
    load_pipeline_config,
    parse_pipeline_config,
)
from experiments.policy_loader import PolicySpecError, load
from experiments.schedule import ScheduleError, parse_interval
from recap import POSITIVE_PROMPT
from storage import ExperienceStore

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def tiny_config(tmp: Path, **overrides) -> Path:
    """configs/tiny.yaml with its store, MLflow store and checkpoints under ``tmp``."""
    data = yaml.safe_load(TINY.read_text())
    data |= {
        "store_url": f"sqlite:///{tmp / 'experience.db'}",
        "mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "checkpoints": str(tmp / "checkpoints"),
    }
    for key, value in overrides.items():
        data[key] = value
    path = tmp / f"pipeline-{len(list(tmp.glob('pipeline-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory) -> tuple[Pipeline, Path]:
    """Iteration 1 with the tiny config (gate rule 'point': the 10-step VLA is worse than the noisy expert and
    is rejected); iteration 2 with gate rule 'always' (promoted, deployed), both through the CLI."""
    tmp = tmp_path_factory.mktemp("pipeline")
    runner = CliRunner()
    reads: list[list[tuple[str, str]]] = [[], []]  # per iteration: (calling module, episode uuid)
    load_episode = ExperienceStore.load_episode

    def recorded(store, episode_uuid, images=True):
        reads[-1].append((sys._getframe(1).f_globals["__name__"], str(episode_uuid)))
        return load_episode(store, episode_uuid, images)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ExperienceStore, "load_episode", recorded)
        first = runner.invoke(app, ["iterate", "--config", str(tiny_config(tmp)), "--once", "--no-progress"])
        assert first.exit_code == 0, first.output
        reads.append([])
        always = tiny_config(tmp, gate={"rule": "always"})
        second = runner.invoke(
            app, ["iterate", "--config", str(always), "--every", "1s", "--iterations", "1", "--no-progress"]
        )
        assert second.exit_code == 0, second.output
    (tmp / "episode_reads.json").write_text(json.dumps(reads[1:]))
    return Pipeline(load_pipeline_config(always), progress=False), tmp


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(PipelineConfigError, match=r"gate\.confidence"):
        parse_pipeline_config({"name": "x", "tasks": ["reach-v3"], "gate": {"confidence": 2}})
    with pytest.raises(PipelineConfigError, match=r"method: Input should be 'recap', 'rlt' or 'both'"):
        parse_pipeline_config({"name": "x", "tasks": ["reach-v3"], "method": "ppo"})
    with pytest.raises(
        PipelineConfigError, match=r"tasks: unknown Meta-World task 'reach-v9'; closest names: reach-v3"
    ):
        parse_pipeline_config({"name": "x", "tasks": ["reach-v9"]})
    with pytest.raises(PipelineConfigError, match=r"collection\.episodes_per_tsk: Extra inputs"):
        parse_pipeline_config({"name": "x", "tasks": ["reach-v3"], "collection": {"episodes_per_tsk": 3}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(PipelineConfigError, match="not valid YAML"):
        load_pipeline_config(bad)
    assert load_pipeline_config(REPO / "configs" / "reach-recap.yaml").tasks == ["reach-v3"]
    result = CliRunner().invoke(app, ["iterate", "--config", str(bad), "--once"])
    assert result.exit_code == 2 and "not valid YAML" in result.output


def test_schedule_intervals():
    assert parse_interval("6h") == 21600 and parse_interval("1h30m") == 5400 and parse_interval("90s") == 90
    for bad in ("6", "six hours", "0s", "6h x"):
        with pytest.raises(ScheduleError, match="--every"):
            parse_interval(bad)


def test_gate_rule_rejects_confidently_worse_and_tolerates_noise():
    strict = GateSettings(rule="ci")
    assert not decide((2, 50), (35, 50), strict).promote  # much worse: rejected
    assert decide((30, 50), (35, 50), strict).promote  # within noise: not worse
    assert decide((45, 50), (35, 50), strict).promote
    assert not decide((30, 50), (35, 50), GateSettings(rule="point")).promote
    assert decide((30, 50), (35, 50), GateSettings(rule="point", margin=0.1)).promote
    rejected = decide((0, 10), (9, 10), strict)
    assert rejected.reason.startswith("rejected") and "0/10" in rejected.reason and "9/10" in rejected.reason


def test_store_records_every_stage_without_duplicates(two_iterations):
    pipeline, _ = two_iterations
    store, config = pipeline.store, pipeline.config
    states = pipeline.iterations()
    assert [s.iteration for s in states] == [1, 2] and all(s.finished for s in states)
    assert all(set(s.outputs) == set(STAGES) for s in states)
    for state in states:
        [run] = state.outputs["collect"].runs.values()
        assert store.count_episodes(run_id=run) == config.collection.episodes_per_task
        relabel = store.load_relabel(state.outputs["relabel"].relabel_id)
        assert relabel.config["pipeline_stage"] == pipeline.stage_id(state.iteration, "relabel")
        # iteration n relabels and trains on all data collected so far (the aggregated runs)
        assert len(relabel.labels) == state.iteration * config.collection.episodes_per_task
    relabels = [r for r in store.list_relabels(method="recap") if "pipeline_stage" in r.config]
    assert len(relabels) == 2
    versions = {row["version"]: row for row in store.policy_versions()}
    prior = pipeline.prior_version()
    for state in states:
        candidate = versions[state.outputs["train"].version]
        assert candidate["kind"] == "vla" and candidate["parent"] == prior
        assert Path(candidate["uri"]).is_dir()
        # the checkpoint carries its RECAP inference conditions; loading applies them once, from inference.json
        loaded = pipeline._load(candidate["version"], config.tasks[0])
        assert (loaded.conditions, loaded.cfg_beta) == (POSITIVE_PROMPT, config.cfg_beta)
        evaluations = store.list_evaluations(policy_version=candidate["version"])
        assert [e.n for e in evaluations] == [config.evaluation.episodes]
    # the deployed prior is evaluated once and reused by iteration 2
    assert len(store.list_evaluations(policy_version=prior)) == 1


def test_each_iteration_reads_its_episodes_once(two_iterations):
    """Relabel and train share one read of the iteration's episodes; only the report's videos read some again."""
    pipeline, tmp = two_iterations
    reads = json.loads((tmp / "episode_reads.json").read_text())
    for state, iteration_reads in zip(pipeline.iterations(), reads, strict=True):
        labelled = {
            str(labels.episode_uuid)
            for labels in pipeline.store.load_relabel(state.outputs["relabel"].relabel_id).labels
        }
        training = [uuid for module, uuid in iteration_reads if module == "experiments.training"]
        assert sorted(training) == sorted(labelled)
        assert {module for module, _ in iteration_reads} == {
            "experiments.training",
            "experiments.pipeline_artifacts",
        }


def test_gate_rejects_worse_policy_and_it_stays_registered(two_iterations):
    pipeline, _ = two_iterations
    first, second = pipeline.iterations()
    gate = first.outputs["gate"]
    assert not gate.promote and gate.reason.startswith("rejected")
    assert gate.candidate_rate < gate.deployed_rate
    assert first.outputs["deploy"].deployed == pipeline.prior_version()
    client = MlflowClient(pipeline.config.mlflow_uri, registry_uri=pipeline.config.mlflow_uri)
    rejected = client.get_model_version(pipeline.tracker.model_name, first.outputs["register"].model_version)
    assert (
        rejected.tags["gate"] == "rejected"
        and rejected.tags["store_version"] == first.outputs["train"].version
    )
    assert rejected.description == gate.reason
    # iteration 2 (rule 'always') promotes: alias, deploy file and `flywheel serve`'s @FILE agree
    assert (
        second.outputs["gate"].promote
        and second.outputs["deploy"].deployed == second.outputs["train"].version
    )
    deployed = client.get_model_version_by_alias(pipeline.tracker.model_name, "deployed")
    assert deployed.tags["store_version"] == second.outputs["train"].version
    assert pipeline.deploy_file().read_text().strip() == second.outputs["train"].version
    assert pipeline.deployed_version() == second.outputs["train"].version
    served = load(f"@{pipeline.deploy_file()}", store=pipeline.store)
    assert served.version == second.outputs["train"].version


def test_mlflow_runs_metrics_and_artifacts(two_iterations):
    pipeline, _ = two_iterations
    client = MlflowClient(pipeline.config.mlflow_uri)
    experiment = client.get_experiment_by_name("flywheel/tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on training runs
    runs = client.search_runs([experiment.experiment_id], "tags.`flywheel.stage` = 'iteration'")
    assert sorted(r.info.run_name for r in runs) == ["iteration-1", "iteration-2"]
    for run in runs:
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        for key in (
            "candidate_success_rate",
            "deployed_success_rate",
            "candidate_successes_per_hour",
            "candidate_episode_length",
            "reach-v3/intervention_rate",
            "value_loss",
            "advantage_positive_fraction",
            "final_train_loss",
            "conditioning/conditioning_gap",  # does the candidate read its advantage text
            "diag/value_episode_rank",
            "promoted",
        ):
            assert key in metrics, key
        assert run.data.params["collection.episodes_per_task"] == "6"
        stages = client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
        )
        assert sorted(s.data.tags["flywheel.stage"] for s in stages) == sorted(STAGES)
        assert all(s.info.status == "FINISHED" for s in stages)
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"pipeline.yaml", "relabel_ids.json", "stages.json", "plots", "videos"} <= files
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert "plots/success_over_iterations.png" in plots
        assert "plots/episode_view.png" in plots
        videos = [a.path for a in client.list_artifacts(run.info.run_id, "videos")]
        assert videos and all(v.endswith(".gif") for v in videos)
        for video in videos:  # 48 px camera frames, scaled up to be judged; the pair side by side
            frames = iio.imread(client.download_artifacts(run.info.run_id, video))
            assert frames.ndim == 4 and frames.shape[1] >= 128, (video, frames.shape)
        pair = iio.imread(client.download_artifacts(run.info.run_id, "videos/candidate_vs_deployed.gif"))
        assert pair.shape[2] == 2 * VIDEO_SIDE and pair.shape[1] > VIDEO_SIDE, pair.shape
        local = Path(client.download_artifacts(run.info.run_id, "plots/success_over_iterations.png"))
        assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_runs = client.search_runs([experiment.experiment_id], "tags.`flywheel.stage` = 'train'")
    history = client.get_metric_history(train_runs[0].info.run_id, "train_loss")
    assert len(history) >= 1


def test_deployed_model_loads_with_mlflow_in_a_fresh_process(two_iterations, tmp_path, monkeypatch):
    """The registry is a place to pull from: the deployed version is a pyfunc model with a signature that a
    fresh process loads with MLflow alone, and ``models:/`` is a policy spec of the one loader."""
    pipeline, _ = two_iterations
    env = pipeline.config.env
    script = f"""
import json, mlflow, numpy as np
model = mlflow.pyfunc.load_model("models:/flywheel-tiny@deployed")
schema = model.metadata.get_input_schema()
names, state_dim = [spec.name for spec in schema.inputs], schema.input_dict()["state"].shape[1]
batch = {{"state": np.zeros((2, state_dim), np.float32), "prompt": np.array(["reach the goal"] * 2, dtype=object),
         "images/corner2": np.zeros((2, {env.image_size}, {env.image_size}, 3), np.uint8)}}
print(json.dumps({{"inputs": names, "shape": list(model.predict(batch).shape)}}))
"""
    uri = pipeline.config.mlflow_uri
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    deployed = load(pipeline.deployed_version(), store=pipeline.store)
    assert answer["inputs"] == ["state", "prompt", "images/corner2"]
    assert answer["shape"] == [2, deployed.action_horizon, deployed.action_dim]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    second = pipeline.iterations()[1].outputs["register"].model_version
    for spec in ("models:/flywheel-tiny@deployed", f"models:/flywheel-tiny/{second}"):
        assert load(spec).version == deployed.version
    with pytest.raises(PolicySpecError, match="alias nope not found"):
        load("models:/flywheel-tiny@nope")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_dashboard_serves_runs_metrics_and_plots(two_iterations):
    pipeline, tmp = two_iterations
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.cli",
            "dashboard",
            "--tracking-uri",
            pipeline.config.mlflow_uri,
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _get(f"{base}/health")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "dashboard did not start"
                time.sleep(1)
        name = urllib.parse.quote("flywheel/tiny")
        experiment = json.loads(_get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"))
        experiment_id = experiment["experiment"]["experiment_id"]
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps(
                {"experiment_ids": [experiment_id], "filter": "tags.`flywheel.stage` = 'iteration'"}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.loads(urllib.request.urlopen(request, timeout=10).read())["runs"]
        assert sorted(r["info"]["run_name"] for r in runs) == ["iteration-1", "iteration-2"]
        run = runs[0]
        metric_keys = {m["key"] for m in run["data"]["metrics"]}
        assert {"candidate_success_rate", "value_loss", "advantage_positive_fraction"} <= metric_keys
        run_id = run["info"]["run_id"]
        listing = json.loads(_get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=plots"))
        assert any(f["path"] == "plots/success_over_iterations.png" for f in listing["files"])
        png = _get(f"{base}/get-artifact?path=plots/success_over_iterations.png&run_uuid={run_id}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        other = runs[1]
        page = f"{base}/#/experiments/{experiment_id}/runs/"
        overview = _browser_dom(page + run_id, tmp)
        _assert_shows_run(overview, run)
        with pytest.raises(AssertionError):  # the check tells runs apart: not satisfied by another run's page
            _assert_shows_run(overview, other)
        plot = "plots/success_over_iterations.png"
        artifact = _browser_dom(f"{page}{run_id}/artifacts/{plot}", tmp)
        assert f'artifact-name="{Path(plot).name}"' in artifact and f'<img alt="{plot}"' in artifact, (
            artifact[-2000:]
        )
    finally:
        os.killpg(server.pid, 9)
        server.wait()


def _browser_dom(url: str, tmp: Path) -> str:
    """The DOM headless chromium renders for ``url`` (MLflow's UI is a JavaScript app)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium where apt is available)")
    profile = tempfile.mkdtemp(dir=tmp)
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=30000",
        "--dump-dom",
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180).stdout


def _assert_shows_run(dom: str, run: dict) -> None:
    """The run page shows this run: its name in the run header and its candidate success rate as MLflow
    prints it (a JavaScript number: 1 rather than 1.0)."""
    value = next(m["value"] for m in run["data"]["metrics"] if m["key"] == "candidate_success_rate")
    shown = str(int(value)) if float(value).is_integer() else repr(float(value))
    assert f'data-testid="runs-header">{run["info"]["run_name"]}<' in dom, dom[-2000:]
    assert "candidate_success_rate" in dom and f">{shown}<" in dom, (shown, dom[-2000:])


def test_schedule_resumes_from_the_store_and_is_exclusive(two_iterations):
    import datetime as dt

    from experiments.schedule import next_due, pipeline_lock, run_once

    pipeline, _ = two_iterations
    finished = pipeline.finished_at(2)
    assert next_due(pipeline, 3600) == finished + dt.timedelta(
        hours=1
    )  # a restarted scheduler keeps the cadence
    with pipeline_lock(pipeline), pytest.raises(ScheduleError, match="already being iterated"):
        run_once(pipeline)
