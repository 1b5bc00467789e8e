"""The one policy loader (``experiments.policy_loader``): it dispatches every kind (VLA, hierarchical, RLT,
scripted, openpi, ``@FILE``, registered versions) on the checkpoint's manifest; ``openpi:`` specs (with options)
collect against a served policy; RLT checkpoints (written by ``flywheel rlt`` in a subprocess and by the
pipeline's RLT stage: one manifest) collect and serve;
a deploy file naming the scripted prior serves (issue 21's regression)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter
from typer.testing import CliRunner

from envs import EnvConfig, MetaWorldEnv
from envs.scripted import ScriptedPolicy
from experiments.cli import app
from experiments.collection import CollectConfig, run_collection
from experiments.pipeline_rlt import RLTStage, deployment_for, load_rlt_policy, run_rlt
from experiments.policy_loader import PolicySpecError, load, resolve
from policies.base import stack_observations
from policies.checkpoint import save_checkpoint
from policies.openpi_client import OpenPIClientPolicy, ServerError
from policies.serving import BackgroundServer, ObservationKeys, PolicyServer, ServerConfig
from rlt.actor import RLTActor
from rlt.checkpoint import MANIFEST_FILE, load_rlt_checkpoint, read_rlt_manifest
from rlt.config import RLTConfig
from rlt.deployment import PriorSpec, RLTDeployment
from rlt.phase import AlwaysCritical, DistanceSwitch
from storage import ExperienceStore, StepSource

TASK = "peg-insert-side-v3"
runner = CliRunner()


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    """A tiny ``flywheel rlt`` run, the real CLI in a subprocess, its settings from ``--config`` (a pipeline
    config's ``rlt:`` block), flags and ``--set``: store URL and RLT version."""
    home = tmp_path_factory.mktemp("rlt")
    url = f"sqlite:///{home / 'store.db'}"
    (home / "rlt.yaml").write_text("name: x\ntasks: [reach-v3]\nrlt:\n  online:\n    token_steps: 5\n")
    args = ["rlt", "--task", TASK, "--db", url, "--env-steps", "30", "--warmup-episodes", "1"]
    args += ["--episode-steps", "30", "--handoff-distance", "0", "--eval-episodes", "1", "--config"]
    args += [str(home / "rlt.yaml"), "--set", "learner.net_arch=[64, 64]", "--no-progress"]
    args += ["--output", str(home / "ckpt")]
    env = os.environ | {"COLUMNS": "200", "FLYWHEEL_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_rlt_manifest(home / "ckpt")
    assert manifest.config.online.token_steps == 5 and manifest.config.learner.net_arch == (64, 64)
    assert manifest.config.handoff == "always" and manifest.config.online.total_env_steps == 30
    return url, manifest.rl_version


def test_collect_with_an_rlt_version_stores_episodes_naming_it(trained, tmp_path) -> None:
    url, version = trained
    before = {record.uuid for record in ExperienceStore(url).iter_episodes(task=TASK)}
    args = ["collect", "--task", TASK, "--policy", version, "--episodes", "2", "--no-images", "--db", url]
    result = runner.invoke(app, args, env={"COLUMNS": "200", "FLYWHEEL_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    store = ExperienceStore(url)
    collected = [r for r in store.iter_episodes(task=TASK) if r.uuid not in before]
    assert len(collected) == 2
    for record in collected:
        from_policy = [
            v
            for v, source in zip(record.policy_versions, record.sources, strict=True)
            if source == StepSource.POLICY
        ]
        assert from_policy and set(from_policy) == {version}, (
            "hand-off at distance 0: RLT acts on every chunk"
        )
    row = next(row for row in store.policy_versions() if row["version"] == version)
    assert row["kind"] == "rlt" and row["parent"] == "scripted-noise0.3"


def test_loaded_rlt_policy_is_the_prior_plus_the_saved_actor(trained, tmp_path) -> None:
    url, version = trained
    store = ExperienceStore(url)
    policy = load(version, task=TASK, store=store)
    assert isinstance(policy, RLTActor) and policy.version == version
    assert isinstance(policy.switch, AlwaysCritical) and policy.action_horizon == 10
    observation, _ = MetaWorldEnv(EnvConfig(task=TASK, render=False, seed=3)).reset(seed=3)
    policy.reset()
    chunk = policy.infer(stack_observations([observation]))
    assert chunk.actions.shape == (1, 10, 4) and np.all(np.abs(chunk.actions) <= 1.0)
    prior = policy.prior.infer(stack_observations([observation])).actions[:, :10]
    assert not np.allclose(chunk.actions, prior), "the RLT actor, not the prior, acts after the hand-off"

    served = {key: value for key, value in observation.items() if key != "privileged"}
    policy.reset()
    with pytest.raises(ValueError, match="needs 'privileged'") as error:
        policy.infer(stack_observations([served]))
    assert "\n" not in str(error.value)

    with pytest.raises(PolicySpecError, match=f"trained on '{TASK}', not 'reach-v3'"):
        load(version, task="reach-v3", store=store)
    directory = _checkpoint(store, version)
    assert resolve(str(directory)).kind == "rlt" and (directory / "policy.json").is_file()
    assert load(str(directory)).version == version, "its scripted prior needs no store; the manifest names it"


def _checkpoint(store: ExperienceStore, version: str) -> Path:
    return Path(store.policy_version(version)["uri"])


def test_both_writers_leave_one_deployment_block(trained, tmp_path) -> None:
    """``flywheel rlt`` and the pipeline's stage write the same ``deployment`` block; its hand-off rebuilds."""
    url, version = trained
    cli = load_rlt_checkpoint(_checkpoint(ExperienceStore(url), version)).deployment
    assert cli == RLTDeployment(TASK, PriorSpec("scripted-noise0.3", 0.3, 0), "always", 0.0)
    assert isinstance(cli.switch(), AlwaysCritical)
    pipeline = deployment_for(TASK, PriorSpec("vla-7", None, 4), RLTConfig(handoff="object-goal"))
    assert _round_trip(pipeline) == pipeline
    assert isinstance(pipeline.switch(), DistanceSwitch)
    always = deployment_for(TASK, PriorSpec("vla-7", None, 4), RLTConfig(handoff="always"))
    assert always.handoff_distance == 0.0 and isinstance(always.switch(), AlwaysCritical)


def _round_trip(deployment: RLTDeployment) -> RLTDeployment:
    """The deployment block through the manifest's JSON."""
    adapter = TypeAdapter(RLTDeployment)
    return adapter.validate_json(adapter.dump_json(deployment))


def test_a_prior_without_embeddings_deploys_with_the_projection_it_trained_on() -> None:
    """A stored prior that returns no embeddings is recorded as projected; deployment rebuilds the same
    embeddings from the manifest instead of loading the bare version."""
    observation = MetaWorldEnv(EnvConfig(task=TASK, render=False)).reset(seed=0)[0]
    bare = ScriptedPolicy(TASK, seed=0, action_horizon=10, version="state-bc-1")
    assert bare.infer(stack_observations([observation])).embeddings is None
    spec = PriorSpec("state-bc-1", None, 3, projected_embeddings=True)
    loaded = _round_trip(RLTDeployment(TASK, spec, "hand-object", 0.05)).prior
    assert loaded == spec
    trained = spec.load(TASK, 10, lambda _: bare).infer(stack_observations([observation])).embeddings
    deployed = loaded.load(TASK, 10, lambda _: bare).infer(stack_observations([observation])).embeddings
    assert trained is not None and trained.shape == (1, 8, 32)
    np.testing.assert_array_equal(deployed, trained)
    unprojected = PriorSpec("state-bc-1", None, 3).load(TASK, 10, lambda _: bare)
    assert unprojected.infer(stack_observations([observation])).embeddings is None


def test_an_older_or_broken_manifest_is_a_one_line_error(trained, tmp_path) -> None:
    """A manifest of the two layouts before the one writer (no ``format``) says how to rewrite it; a current one
    missing a field names it."""
    url, version = trained
    store = ExperienceStore(url)
    source = _checkpoint(store, version)
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    older = {key: value for key, value in manifest.items() if key not in ("format", "config", "token")}
    for name, document, message in (
        ("older", older, "written by an older flywheel .* retrain it with the same `flywheel rlt` command"),
        (
            "broken",
            {k: v for k, v in manifest.items() if k != "deployment"},
            "rlt.json deployment: Field required",
        ),
    ):
        folder = tmp_path / name
        folder.mkdir()
        for file in ("actor_critic.safetensors", "rl_token.safetensors"):
            (folder / file).write_bytes((source / file).read_bytes())
        (folder / MANIFEST_FILE).write_text(json.dumps(document))
        with pytest.raises(PolicySpecError, match=message) as error:
            load(str(folder), task=TASK, store=store)
        assert "\n" not in str(error.value)


def test_a_pipeline_rlt_checkpoint_loads_and_collects(trained, tmp_path) -> None:
    """The pipeline's RLT stage (``run_rlt``, tiny budget, distance hand-off) writes the manifest ``flywheel rlt``
    writes, field for field; ``load`` rebuilds it with its hand-off, the actor acts once the hand is near the
    peg, and the collected episodes name the RLT version."""
    url = f"sqlite:///{tmp_path / 'pipeline.db'}"
    store = ExperienceStore(url)
    store.upgrade()
    prior = PriorSpec("scripted-noise0.3", 0.3, 0)
    store.register_policy_version(prior.version, kind="scripted", metadata={"noise_std": 0.3})
    config = RLTConfig.model_validate(
        {
            "handoff_distance": 0.1,
            "online": {"warmup_episodes": 1, "total_env_steps": 30, "eval_episodes": 1, "token_steps": 5},
            "learner": {"net_arch": [32, 32], "batch_size": 16, "learning_starts": 16},
        }
    )
    env = EnvConfig(task=TASK, render=False, max_episode_steps=150, seed=0)  # hand near the peg by ~100
    version = "rlt:tiny/iter-0001"
    load_version = lambda spec: load(spec, task=TASK, store=store)  # noqa: E731 (unused: the prior is scripted)
    stage = RLTStage(store, prior, load_version, env, config, version, "rlt-run", tmp_path / "rlt", seed=0)
    result = run_rlt(stage)
    assert result.manifest == read_rlt_manifest(tmp_path / "rlt") and result.manifest.rl_version == version
    cli = json.loads((_checkpoint(ExperienceStore(trained[0]), trained[1]) / MANIFEST_FILE).read_text())
    assert set(json.loads((tmp_path / "rlt" / MANIFEST_FILE).read_text())) == set(cli)
    assert result.manifest.config == config and result.manifest.env == env
    assert [stats.mode for stats in result.episode_stats][:1] == ["prior"] and result.manifest.env_steps >= 30

    policy = load(version, task=TASK, store=store)
    assert load(str(tmp_path / "rlt"), store=store).version == version, "the manifest names the version"
    assert isinstance(policy, RLTActor) and isinstance(policy.switch, DistanceSwitch)
    assert policy.switch.threshold == 0.1
    acted: list[int] = []
    act = policy.learner.act
    policy.learner.act = lambda states, chunks: (acted.append(len(chunks)), act(states, chunks))[1]
    config = CollectConfig(
        env=env, policy=version, episodes=2, store_url=url, record_images=False, run_id="c"
    )
    report = run_collection(config, progress=False, policy=policy)
    assert report.episodes == 2 and report.policy_version == version
    assert acted, "the hand-off fired and the RLT actor produced chunks"
    for record in ExperienceStore(url).iter_episodes(run_id="c"):
        critical = np.asarray(record.metadata["critical_phase"], bool)
        expected = np.where(critical, version, policy.prior.version)  # the RLT actor after the hand-off
        from_policy = record.sources == StepSource.POLICY
        assert np.array(record.policy_versions)[from_policy].tolist() == expected[from_policy].tolist()
        assert record.policy_version == version and record.metadata["mode"] == "eval"
        assert record.reference_chunks.shape == record.chunks.shape


def test_serve_an_rlt_version_and_name_the_missing_privileged_state(trained) -> None:
    """``flywheel serve`` resolves the RLT version; a client that keeps ``privileged`` back gets one line."""
    url, version = trained
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "experiments.cli", "serve", "--policy", version, "--db", url]
    process = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    observation, _ = MetaWorldEnv(EnvConfig(task=TASK, render=False, seed=1)).reset(seed=1)
    try:
        client = OpenPIClientPolicy(f"ws://127.0.0.1:{port}", send_privileged=True, connect_timeout_s=60)
        assert client.infer_one(observation)["policy_version"] == version
        blind = OpenPIClientPolicy(f"ws://127.0.0.1:{port}", connect_timeout_s=60)
        with pytest.raises(ServerError, match="privileged") as error:
            blind.infer_one(observation)
        assert "\n" not in str(error.value)
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_the_pipeline_rebuilds_a_flywheel_rlt_checkpoint(trained) -> None:
    """``load_rlt_policy`` (the pipeline's loader) rebuilds ``flywheel rlt``'s checkpoint too, so the pipeline can
    deploy such a checkpoint's version as its prior."""
    url, version = trained
    store = ExperienceStore(url)
    policy = load_rlt_policy(
        _checkpoint(store, version), version, TASK, lambda spec: load(spec, task=TASK, store=store)
    )
    assert isinstance(policy.switch, AlwaysCritical) and policy.prior.version == "scripted-noise0.3"
    assert policy.version == version and policy.action_horizon == 10


class OpenPIStyleServer(PolicyServer):
    """A flywheel server that answers like openpi's: metadata ``{}``, replies without a policy version."""

    def metadata(self) -> dict:
        return {}

    async def _answer(self, message: str | bytes) -> dict:
        reply = await super()._answer(message)
        del reply["policy_version"]
        return reply


def _served_scripted(server_class: type[PolicyServer] = PolicyServer) -> BackgroundServer:
    """reach-v3's scripted expert (H=8) behind an API key, taking openpi-style field names."""
    config = ServerConfig(
        port=0,
        api_key="k-openpi",
        allow_privileged=True,
        keys=ObservationKeys.parse(["image:corner=observation/image"]),
    )
    policy = ScriptedPolicy("reach-v3", action_horizon=8, version="scripted-served")
    return BackgroundServer(server_class(policy, config))


def _collect(url: str, spec: str, run_id: str) -> list:
    env = EnvConfig(task="reach-v3", cameras=("corner",), width=16, height=16, max_episode_steps=24)
    config = CollectConfig(
        env=env, policy=spec, episodes=2, store_url=url, record_images=False, run_id=run_id
    )
    run_collection(config, progress=False)
    return list(ExperienceStore(url).iter_episodes(run_id=run_id))


def _policy_step_versions(record) -> set:
    return {v for v, s in zip(record.policy_versions, record.sources, strict=True) if s == StepSource.POLICY}


def test_collect_through_an_openpi_spec_with_key_map_api_key_and_horizon(tmp_path, monkeypatch) -> None:
    """``openpi:ws://…?options`` reaches a keyed server with openpi field names; the chunks are cut to the
    spec's horizon; every policy step names the served version, registered as kind ``openpi``."""
    monkeypatch.setenv("FW_OPENPI_KEY", "k-openpi")
    url = f"sqlite:///{tmp_path / 'fw.db'}"
    options = "key=image:corner=observation/image&privileged=1&api_key_env=FW_OPENPI_KEY&horizon=5"
    with _served_scripted() as background:
        records = _collect(url, f"openpi:{background.url}?{options}", "openpi-run")
        calls = background.server.stats()["requests"]
        store = ExperienceStore(url)
        for extra, message in [
            ("horizon=9", "action_horizon=9 does not fit the server's action_horizon 8"),
            ("dim=3", "action_dim=3 does not fit the server's action_dim 4"),
        ]:
            with pytest.raises(PolicySpecError, match=message):
                load(f"openpi:{background.url}?{options}&{extra}", task="reach-v3", store=store)
    assert len(records) == 2 and calls >= 2 * 24 // 5
    for record in records:
        assert record.length == 24 and _policy_step_versions(record) == {"scripted-served"}
        assert set(record.chunk_offsets.tolist()) == set(range(5)), "chunks cut to horizon=5"
    row = ExperienceStore(url).policy_version("scripted-served")
    assert row["kind"] == "openpi" and row["uri"] == f"openpi:{background.url}?{options}", (
        "the spec reloads it"
    )
    assert row["metadata"]["action_horizon"] == 5 and "k-openpi" not in json.dumps(row["metadata"])


def test_an_openpi_server_with_empty_metadata_needs_horizon_and_dim(tmp_path, monkeypatch) -> None:
    """Against an openpi-style server (metadata ``{}``, no version in replies) the spec supplies H, D and the
    version to record; leaving H out is a one-line error naming the option."""
    monkeypatch.setenv("FW_OPENPI_KEY", "k-openpi")
    url = f"sqlite:///{tmp_path / 'fw.db'}"
    store = ExperienceStore(url)
    store.upgrade()
    options = "key=image:corner=observation/image&privileged=1&api_key_env=FW_OPENPI_KEY"
    with _served_scripted(OpenPIStyleServer) as background:
        with pytest.raises(PolicySpecError, match="no 'action_horizon'; add horizon=N") as error:
            load(f"openpi:{background.url}?{options}", task="reach-v3", store=store)
        assert "\n" not in str(error.value)
        spec = f"openpi:{background.url}?{options}&horizon=8&dim=4&version=pi-like"
        records = _collect(url, spec, "openpi-style")
    assert len(records) == 2
    assert all(_policy_step_versions(record) == {"pi-like"} for record in records)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("horizon=ten", "horizon='ten'; expected a positive int"),
        ("dims=4", "unknown option 'dims'; known: keys, key,"),
        ("keys=aloha", "keys='aloha'; expected libero or droid"),
        ("key=image:corner", "expected NAME=WIRE_KEY"),
        ("api_key_env=FW_SURELY_UNSET", "environment variable 'FW_SURELY_UNSET' is unset"),
        ("privileged=yes", "privileged='yes'; expected 1 or 0"),
        ("horizon", "option 'horizon': expected option=value"),
    ],
)
def test_bad_openpi_options_are_one_line_errors(tmp_path, monkeypatch, options, message) -> None:
    monkeypatch.delenv("FW_SURELY_UNSET", raising=False)
    args = ["collect", "--task", "reach-v3", "--episodes", "1", "--db", f"sqlite:///{tmp_path / 'fw.db'}"]
    result = runner.invoke(
        app, [*args, "--policy", f"openpi:ws://127.0.0.1:9?{options}"], env={"COLUMNS": "300"}
    )
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_the_loader_dispatches_every_kind_and_registered_uris_reload(tmp_path) -> None:
    """Each kind loads from its spec (the checkpoint's ``policy.json``, or its files for a checkpoint written
    before manifests), from ``@FILE`` and, once ``register``\\ed, from its version: the uri reloads it. A
    hierarchical checkpoint serves."""
    from experiments.commands.serve import ServeConfig, build_server
    from experiments.policy_loader import register
    from policies.hierarchical import HierarchicalPolicy, save_hierarchical
    from policies.vla import VLAPolicy
    from tests.test_hierarchical import PROMPT, _samples, _two_level
    from tests.test_serving import _tiny_vla

    store = ExperienceStore(f"sqlite:///{tmp_path / 'fw.db'}")
    store.upgrade()
    vla_version = save_checkpoint(_tiny_vla(), tmp_path / "vla")
    images, state, _, labels = _samples(40, size=48)  # _two_level's episode is 40 steps
    hierarchical = save_hierarchical(_two_level(images, state, labels, steps=2)[0], tmp_path / "hier")
    noisy = f"scripted:{TASK}?noise=0.2"
    cases = {
        str(tmp_path / "vla"): ("vla", VLAPolicy, vla_version),
        str(tmp_path / "hier"): ("hierarchical", HierarchicalPolicy, hierarchical),
        "scripted": ("scripted", ScriptedPolicy, "scripted-noise0"),
        noisy: ("scripted", ScriptedPolicy, noisy),
    }
    deploy = tmp_path / "deployed"
    for spec, (kind, policy_type, version) in cases.items():
        source = resolve(spec, store)
        policy = load(source, task=TASK, store=store)
        assert source.kind == kind and type(policy) is policy_type and policy.version == version, spec
        assert store.policy_version(version) is None, "loading registers nothing"
        register(store, source, version)
        deploy.write_text(f"{version}\n")
        again = load(f"@{deploy}", task=TASK, store=store)
        assert type(again) is policy_type and again.version == version, spec
    assert load(noisy).noise_std == 0.2 and load(noisy).task == TASK
    assert resolve("openpi:ws://127.0.0.1:1?horizon=4").kind == "openpi"

    for directory, kind in [(tmp_path / "vla", "vla"), (tmp_path / "hier", "hierarchical")]:
        (directory / "policy.json").unlink()  # as written before manifests
        assert resolve(str(directory)).kind == kind
    (tmp_path / "vla" / "policy.json").write_text('{"kind": "pi0"}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("\n")
    for spec, message in [
        (str(tmp_path / "vla"), "kind 'pi0' is not one of vla, hierarchical, rlt"),
        (str(tmp_path / "empty"), "no checkpoint in this directory"),
        ("v9", "no such version registered"),
        ("scripted:reach-v3?noise=-1", "noise='-1'; expected a number >= 0"),
        (f"@{tmp_path / 'nowhere'}", "is not a file"),
        (f"@{tmp_path / 'empty.txt'}", "empty.txt is empty"),
    ]:
        with pytest.raises(PolicySpecError, match=message) as error:
            load(spec, store=store)
        assert "\n" not in str(error.value)
    blank = ExperienceStore(f"sqlite:///{tmp_path / 'blank.db'}")  # e.g. serve's default store, never created
    with pytest.raises(PolicySpecError, match=r"'v9': not 'scripted.*has no registered versions"):
        load("v9", store=blank)
    with pytest.raises(PolicySpecError, match=f"the scripted expert of '{TASK}', not 'push-v3'"):
        load(f"scripted:{TASK}", task="push-v3")

    observation = {"images": {"corner": images[0]}, "state": state[0], "prompt": PROMPT}
    server = build_server(ServeConfig(policy=str(tmp_path / "hier"), port=0))
    with BackgroundServer(server) as background, OpenPIClientPolicy(background.url) as client:
        reply = client.infer_one(observation)
    assert reply["policy_version"] == hierarchical and np.asarray(reply["actions"]).shape[1] == 4


def test_a_deploy_file_naming_the_scripted_prior_serves(tmp_path) -> None:
    """Issue 21's regression: the first candidate was rejected, so the deploy file names the pipeline's scripted
    prior; ``flywheel serve --policy @deployed --db URL`` starts and answers as the prior (it failed with
    "no uri": the prior was registered without one). A prior registered that way by an older flywheel loads
    from its recorded noise."""
    from experiments.pipeline import Pipeline
    from experiments.pipeline_config import load_pipeline_config
    from tests.test_pipeline import tiny_config

    pipeline = Pipeline(load_pipeline_config(tiny_config(tmp_path)), progress=False)
    prior = pipeline.prior_version()
    assert pipeline.store.policy_version(prior)["uri"] == "scripted?noise=0.5"
    pipeline.deploy_file().write_text(f"{prior}\n")  # what the deploy stage writes after a rejection
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "experiments.cli", "serve", "--policy", f"@{pipeline.deploy_file()}"]
    command += ["--db", pipeline.config.store_url, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    observation, _ = MetaWorldEnv(EnvConfig(task="reach-v3", render=False, seed=1)).reset(seed=1)
    try:
        client = OpenPIClientPolicy(f"ws://127.0.0.1:{port}", send_privileged=True, connect_timeout_s=90)
        reply = client.infer_one(observation)
        assert reply["policy_version"] == prior and np.isfinite(reply["actions"]).all()
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "Traceback" not in output, output

    legacy = ExperienceStore(f"sqlite:///{tmp_path / 'legacy.db'}")
    legacy.upgrade()
    legacy.register_policy_version("scripted-noise0.3", kind="scripted", metadata={"noise_std": 0.3})
    policy = load("scripted-noise0.3", store=legacy)
    assert (
        isinstance(policy, ScriptedPolicy)
        and policy.version == "scripted-noise0.3"
        and policy.noise_std == 0.3
    )


def test_a_biased_scripted_spec_reloads_the_same_systematic_error(tmp_path) -> None:
    """``scripted?noise=…&goal_bias=x,y,z`` loads the expert with that bias, registers under a uri that reloads it,
    and a malformed bias is a one-line error naming the option."""
    from experiments.policy_loader import register, scripted_spec

    biases = {"object_bias": None, "goal_bias": (0.015, 0.0, 0.0)}
    spec = scripted_spec(0.1, None, biases)
    assert spec == "scripted?noise=0.1&goal_bias=0.015,0,0"
    store = ExperienceStore(f"sqlite:///{tmp_path / 'fw.db'}")
    store.upgrade()
    source = resolve(spec, store)
    policy = load(source, task="reach-v3")
    assert policy.version == "scripted-noise0.1-goal-bias0.015,0,0"
    assert policy.biases == {"object_bias": None, "goal_bias": (0.015, 0.0, 0.0)}
    register(store, source, policy.version)
    assert store.policy_version(policy.version)["metadata"]["goal_bias"] == [0.015, 0.0, 0.0]
    again = load(policy.version, task="reach-v3", store=store)
    observation = stack_observations(
        [MetaWorldEnv(EnvConfig(task="reach-v3", render=False)).reset(seed=3)[0]]
    )
    assert np.array_equal(
        again.infer(observation).actions,
        ScriptedPolicy("reach-v3", noise_std=0.1, goal_bias=(0.015, 0.0, 0.0)).infer(observation).actions,
    )
    with pytest.raises(PolicySpecError, match=r"goal_bias='0.01,0'; expected x,y,z in metres$"):
        load("scripted?goal_bias=0.01,0", task="reach-v3")
