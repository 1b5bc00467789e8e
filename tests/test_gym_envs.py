"""Bring your own gymnasium env (issue 22 items 1 and 3): naming it (registered id, ``module:EnvId``,
``module:Class``), Dict observations → state and cameras, declared success, the one env settings model, the
pipeline config, flywheel's envs registered with gymnasium, and Reacher-v5 (gymnasium's own MuJoCo env) collected,
trained on, evaluated and exported (LeRobot and Minari, read back with the real minari library and its
``recover_environment``). The whole CLI chain on Reacher-v5 is ``test_gym_env_cli_chain`` (slow)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from envs import EnvConfig, EnvSettings, GymEnvConfig, make_env
from envs.registration import env_spec
from experiments.cli import app
from experiments.collection import CollectConfig, run_collection
from experiments.evaluation import evaluate
from experiments.pipeline_config import PipelineConfigError, parse_pipeline_config
from experiments.training import BCConfig, to_episode_arrays, train_vla
from storage import EpisodeQuery, ExperienceStore, Outcome

REACHER = "Reacher-v5"
PROMPT = "touch the red target with the fingertip"
EXPERT = "python:policies.gym_experts:ReacherExpert?noise_std=0.3"
#: Reacher-v5 declares no success: the fingertip within 2 cm of the target (info reward_dist = -distance).
REACHER_SETTINGS = {"success_key": "reward_dist", "success_threshold": -0.02, "prompt": PROMPT, "image_size": 48}

PLUGIN = '''
import gymnasium as gym
import numpy as np


class Dots(gym.Env):
    """A Dict observation with an image; success once ``distance`` (in info) is small enough."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, size=8, render_mode=None):
        self.size = size
        self.observation_space = gym.spaces.Dict({
            "pos": gym.spaces.Box(-1, 1, (2,), np.float32),
            "vel": gym.spaces.Box(-1, 1, (1,), np.float32),
            "pixels": gym.spaces.Dict({"top": gym.spaces.Box(0, 255, (size, size, 3), np.uint8)}),
        })
        self.action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
        self._t = 0

    def _obs(self):
        image = np.full((self.size, self.size, 3), 10 * self._t, np.uint8)
        return {"pos": np.full(2, 0.1 * self._t, np.float32), "vel": np.ones(1, np.float32), "pixels": {"top": image}}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._obs(), {"distance": -1.0}

    def step(self, action):
        self._t += 1
        return self._obs(), 0.0, False, self._t >= 5, {"distance": -1.0 + 0.3 * self._t}


gym.register("FlywheelPlugin/Dots-v0", entry_point=Dots)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> str:
    """A module of the user's, importable but not imported: it registers ``FlywheelPlugin/Dots-v0``."""
    name = f"fw_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_an_env_is_named_by_id_module_env_id_or_module_class(plugin):
    by_module_id = make_env(GymEnvConfig(env_id=f"{plugin}:FlywheelPlugin/Dots-v0", max_episode_steps=3))
    assert by_module_id.reset(seed=0)[0]["state"].shape == (3,)  # registered by importing the module
    truncated = [by_module_id.step(np.zeros(1, np.float32))[3] for _ in range(3)]
    assert truncated == [False, False, True]
    by_class = make_env(GymEnvConfig(env_id=f"{plugin}:Dots", kwargs={"size": 12}, image_keys={"top": "pixels.top"}))
    assert by_class.reset()[0]["images"]["top"].shape == (12, 12, 3)  # kwargs reach the class
    for env in (by_module_id, by_class):
        env.close()
    with pytest.raises(ValidationError, match="cannot import module 'no_such_module'"):
        GymEnvConfig(env_id="no_such_module:Env-v0")
    with pytest.raises(ValidationError, match="registers no gymnasium id 'Nope-v0' and has no env class"):
        GymEnvConfig(env_id=f"{plugin}:Nope-v0")
    assert GymEnvConfig(env_id=REACHER).robot_name == "Reacher"
    assert GymEnvConfig(env_id=f"{plugin}:FlywheelPlugin/Dots-v0").robot_name == "Dots"


def test_dict_observations_map_to_state_and_cameras_and_success_is_declared(plugin):
    config = GymEnvConfig(
        env_id=f"{plugin}:Dots",
        image_keys={"top": "pixels.top"},
        success_key="distance",
        success_threshold=-0.2,
    )
    env = make_env(config)
    observation, info = env.reset()
    np.testing.assert_array_equal(observation["state"], [0.0, 0.0, 1.0])  # pos, vel; the image is a camera
    assert observation["images"]["top"].dtype == np.uint8 and env.observation_space.contains(observation)
    assert info["success"] is False
    steps = [env.step(np.zeros(1, np.float32)) for _ in range(3)]
    np.testing.assert_allclose(steps[-1][0]["state"], [0.3, 0.3, 1.0], rtol=1e-6)
    assert steps[-1][0]["images"]["top"][0, 0, 0] == 30
    assert [step[4]["success"] for step in steps] == [False, False, True]  # -0.1 >= -0.2 at the third
    env.close()
    only_velocity = make_env(config.model_copy(update={"state_keys": ("vel",)}))
    assert only_velocity.reset()[0]["state"].tolist() == [1.0]
    only_velocity.close()
    with pytest.raises(ValueError, match=r"image_keys: 'pixels\.side' is not an observation key"):
        make_env(GymEnvConfig(env_id=f"{plugin}:Dots", image_keys={"side": "pixels.side"}))


def test_one_env_settings_model_builds_either_kind():
    metaworld = EnvSettings(image_size=32).env("reach-v3", seed=4)
    assert isinstance(metaworld, EnvConfig) and metaworld.cameras == ("corner2",) and metaworld.seed == 4
    assert EnvSettings(cameras=()).env("reach-v3").render is False  # the state tier
    reacher = EnvSettings(**REACHER_SETTINGS).env(REACHER)
    assert isinstance(reacher, GymEnvConfig) and reacher.cameras == ("main",) and reacher.instruction == PROMPT
    assert reacher.episode_steps == 50 and reacher.success_threshold == -0.02  # Reacher's registered limit
    assert EnvSettings(**REACHER_SETTINGS).env(REACHER, render=False).cameras == ()
    with pytest.raises(ValueError, match="success_key: applies to gymnasium envs, not the Meta-World task"):
        EnvSettings(success_key="reward_dist").env("reach-v3")
    object_state = EnvSettings(cameras=(), state_parts=("hand", "gripper", "object", "goal"))
    assert object_state.env("pick-place-v3").state_dim == 10
    assert EnvSettings().env("pick-place-v3").state_dim == 7
    with pytest.raises(ValueError, match="state_parts: applies to Meta-World tasks, not the gymnasium env"):
        object_state.env(REACHER)


def test_pipeline_config_takes_a_gymnasium_env():
    config = parse_pipeline_config({"name": "reacher", "tasks": [REACHER], "env": REACHER_SETTINGS})
    assert config.interventions is None  # the simulated human is Meta-World's expert: dropped by default
    assert isinstance(config.env.env(REACHER, 0), GymEnvConfig)
    with pytest.raises(PipelineConfigError, match="interventions: the simulated human is Meta-World's"):
        parse_pipeline_config({"name": "r", "tasks": [REACHER], "interventions": {"random_rate": 0.1}})
    with pytest.raises(PipelineConfigError, match="closest names: Reacher-v5"):
        parse_pipeline_config({"name": "r", "tasks": ["Reachr-v5"]})
    with pytest.raises(PipelineConfigError, match="RLT runs on Meta-World tasks"):
        parse_pipeline_config({"name": "r", "tasks": [REACHER], "method": "rlt"})


def test_flywheel_envs_are_gymnasium_envs():
    """``gymnasium.make("flywheel/<task>")`` works, and every env make_env builds carries a spec that rebuilds it."""
    registered = gym.make("flywheel/reach-v3", config={"task": "reach-v3", "render": False})
    assert registered.reset(seed=1)[0]["state"].shape == (7,)
    registered.close()
    config = EnvConfig(task="reach-v3", render=False, max_episode_steps=30)
    built = make_env(config)
    rebuilt = gym.make(built.unwrapped.spec)
    assert built.unwrapped.spec.id == "flywheel/reach-v3" and rebuilt.unwrapped.config == config
    np.testing.assert_array_equal(built.reset(seed=3)[0]["state"], rebuilt.reset(seed=3)[0]["state"])
    flat = gym.make(env_spec(config, layout="flat"))
    assert set(flat.reset(seed=3)[0]) == {"state"}
    for env in (built, rebuilt, flat):
        env.close()


def test_collect_refuses_what_only_metaworld_has(tmp_path):
    result = CliRunner().invoke(
        app, ["collect", "--task", REACHER, "--policy", "scripted", "--db", f"sqlite:///{tmp_path / 's.db'}"]
    )
    assert result.exit_code == 2 and "Meta-World's scripted expert cannot act in Reacher-v5" in result.output


@pytest.fixture(scope="module")
def reacher_store(tmp_path_factory) -> str:
    """Four Reacher-v5 episodes of the noisy scripted demonstrator, 48 px images."""
    url = f"sqlite:///{tmp_path_factory.mktemp('reacher') / 'store.db'}"
    report = run_collection(
        CollectConfig(
            env=EnvSettings(**REACHER_SETTINGS).env(REACHER, seed=0),
            policy=EXPERT,
            episodes=4,
            store_url=url,
            run_id="reacher-demos",
        ),
        progress=False,
    )
    assert report.episodes == 4 and report.successes >= 3, report  # the expert reaches within 2 cm
    return url


def test_episodes_store_prompt_robot_type_and_env_spec_and_training_reads_the_prompt(reacher_store):
    store = ExperienceStore(reacher_store)
    records = [store.load_episode(s.uuid) for s in store.list_episodes(task=REACHER)]
    assert {r.prompt for r in records} == {PROMPT}
    assert {r.metadata["robot_type"] for r in records} == {"Reacher"} and records[0].metadata["fps"] == 50
    spec = records[0].metadata["env_spec"]
    assert spec["id"] == "flywheel/Reacher-v5" and spec["kwargs"]["config"]["success_threshold"] == -0.02
    assert records[0].images["main"].shape[1:] == (48, 48, 3) and records[0].states.shape[1] == 10
    assert {arrays.prompt for arrays in to_episode_arrays(records)} == {PROMPT}
    old = records[0]
    old.prompt = None  # an episode stored before prompts were: the task table, else the task name
    assert to_episode_arrays([old])[0].prompt == REACHER


def test_train_and_evaluate_on_a_gymnasium_env(reacher_store, tmp_path):
    """BC on Reacher episodes, evaluated in Reacher with its declared success (a few steps: the chain, not the
    learning, is under test)."""
    store = ExperienceStore(reacher_store)
    settings = EnvSettings(**REACHER_SETTINGS)
    config = BCConfig(env=settings.for_model(("main",), 48), steps=3, batch_size=4, eval_episodes=1, checkpoint_every=0)
    trained = train_vla(store, EpisodeQuery(tasks=[REACHER]), config, tmp_path, progress=False)
    assert trained.policy.action_dim == 2 and trained.episodes_used == 4
    [result] = trained.evaluations
    assert result.task == REACHER and result.n == 1 and result.mean_return < 0  # Reacher's negative rewards
    expert_result, records = evaluate(
        __import__("experiments.policy_loader", fromlist=["load"]).load(EXPERT), settings.env(REACHER), 3
    )
    assert expert_result.successes >= 2 and records[0].prompt == PROMPT


def test_exports_carry_robot_type_prompt_success_and_a_recoverable_env(reacher_store, tmp_path, monkeypatch):
    """Minari through the real library: ``recover_environment()`` rebuilds Reacher in the dataset's layout."""
    import minari

    runner = CliRunner()
    lerobot = tmp_path / "lerobot"
    result = runner.invoke(app, ["export", "--format", "lerobot", "--output", str(lerobot), "--db", reacher_store])
    assert result.exit_code == 0, result.output
    info = json.loads((lerobot / "meta" / "info.json").read_text())
    assert info["robot_type"] == "Reacher" and info["fps"] == 50
    import pyarrow.parquet as pq

    assert pq.read_table(lerobot / "meta" / "tasks.parquet").to_pandas().index.tolist() == [PROMPT]
    out = tmp_path / "minari"
    result = runner.invoke(
        app,
        ["export", "--format", "minari", "--output", str(out), "--dataset-id", "flywheel/reacher-v0", "--db", reacher_store],
    )
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out))
    dataset = minari.load_dataset("flywheel/reacher-v0")
    assert dataset.env_spec is not None and dataset.env_spec.id == "flywheel/Reacher-v5"
    store = ExperienceStore(reacher_store)
    outcomes = [s.outcome for s in store.list_episodes(task=REACHER)]
    for loaded, outcome in zip(dataset.iterate_episodes(), outcomes, strict=True):
        assert loaded.infos["success"].tolist() == [False] * len(loaded.actions) + [outcome == Outcome.SUCCESS]
        assert {bytes(p).decode() for p in loaded.infos["prompt"]} == {PROMPT}
    env = dataset.recover_environment()
    try:
        observation, _ = env.reset(seed=0)
        assert env.observation_space == dataset.observation_space and env.action_space == dataset.action_space
        assert observation["main"].shape == (48, 48, 3) and dataset.observation_space.contains(observation)
        *_, info = env.step(env.action_space.sample())
        assert "success" in info
    finally:
        env.close()


def test_minari_export_of_metaworld_episodes_recovers_the_env(tmp_path, monkeypatch):
    import minari

    url = f"sqlite:///{tmp_path / 'store.db'}"
    run_collection(
        CollectConfig(
            env=EnvConfig(task="reach-v3", width=32, height=32, max_episode_steps=15),
            episodes=2,
            store_url=url,
        ),
        progress=False,
    )
    out = tmp_path / "minari"
    result = CliRunner().invoke(
        app, ["export", "--format", "minari", "--output", str(out), "--dataset-id", "flywheel/reach-v0", "--db", url]
    )
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out))
    dataset = minari.load_dataset("flywheel/reach-v0")
    env = dataset.recover_environment()
    try:
        observation, _ = env.reset(seed=5)
        assert set(observation) == {"state", "corner2"} and dataset.observation_space.contains(observation)
        assert env.unwrapped.config.max_episode_steps == 15
    finally:
        env.close()


def _flywheel(home: Path, *args: str) -> str:
    """Run the real ``flywheel`` CLI in a subprocess (its own data folder and MLflow store); its output."""
    result = subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args], env=_env(home), capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, f"flywheel {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _env(home: Path) -> dict[str, str]:
    """The subprocesses' environment: their own data folder and MLflow store, one torch thread each."""
    unset = {"MLFLOW_TRACKING_URI"}
    return {k: v for k, v in os.environ.items() if k not in unset} | {"FLYWHEEL_HOME": str(home), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _served_chunk(home: Path, version: str, url: str, observation: dict) -> np.ndarray:
    """``flywheel serve`` the version; one chunk for ``observation`` through the openpi client."""
    from policies.base import stack_observations
    from policies.openpi_client import OpenPIClientPolicy

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", "serve", "--policy", version, "--db", url, "--port", str(port)],
        env=_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with OpenPIClientPolicy(f"ws://127.0.0.1:{port}", connect_timeout_s=300) as client:
            chunk = client.infer(stack_observations([observation])).actions
            assert client.version == version
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output
    return chunk


@pytest.mark.slow  # eight CLI processes each importing the stack, a BC and a RECAP training: minutes on 2 cores
@pytest.mark.timeout(3600)
def test_gym_env_cli_chain(tmp_path, monkeypatch):
    """collect → train bc → train eval → recap iterate → serve → export on Reacher-v5, through the real CLI.

    State-only episodes (``--no-images``: the state-input VLA), so that the chain fits a loaded 2-core machine;
    Reacher's camera path is the default tests' (``test_train_and_evaluate_on_a_gymnasium_env``)."""
    import minari

    home, url, settings = tmp_path / "home", f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "reacher.yaml"
    settings.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in REACHER_SETTINGS.items()))
    task = ["--task", REACHER, "--env", str(settings), "--db", url]
    collected = _flywheel(home, "collect", *task, "--policy", EXPERT, "--episodes", "6", "--seed", "1", "--no-images")
    assert "episodes 6" in collected
    trained = _flywheel(home, "train", "bc", *task, "--steps", "20", "--batch-size", "8", "--eval-episodes", "2")
    version = re.search(r"→ (vla-\S+)", trained).group(1)
    evaluated = _flywheel(home, "train", "eval", *task, "--policy", version, "--episodes", "2")
    assert REACHER in evaluated and "return" in evaluated and "expert phase" not in evaluated
    iterated = _flywheel(
        home, "recap", "iterate", *task, "--policy", version, "--episodes", "3", "--steps", "10",
        "--value-steps", "10", "--eval-episodes", "1",
    )
    assert "relabel" in iterated
    store = ExperienceStore(url)
    candidates = [row for row in store.policy_versions() if row["parent"] == version]
    assert candidates, "recap iterate registered no retrained version"
    observation = make_env(EnvSettings(**REACHER_SETTINGS).env(REACHER, render=False)).reset(seed=0)[0]
    chunk = _served_chunk(home, candidates[-1]["version"], url, observation)
    assert chunk.shape[0] == 1 and chunk.shape[2] == 2  # Reacher's 2-D torques
    out = tmp_path / "minari"
    _flywheel(home, "export", "--format", "minari", "--output", str(out), "--dataset-id", "flywheel/chain-v0", "--db", url)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out))
    dataset = minari.load_dataset("flywheel/chain-v0")
    assert dataset.total_episodes == 6 + 3 and dataset.env_spec.id == "flywheel/Reacher-v5"
    recovered = dataset.recover_environment()
    assert dataset.observation_space.contains(recovered.reset(seed=1)[0])
    recovered.close()
    _flywheel(home, "export", "--format", "lerobot", "--output", str(tmp_path / "lerobot"), "--db", url)
    assert json.loads((tmp_path / "lerobot" / "meta" / "info.json").read_text())["robot_type"] == "Reacher"
