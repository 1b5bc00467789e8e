"""Meta-World envs and the generic gymnasium adapter: observation contract, orientation, errors, seeds."""

from __future__ import annotations

import threading

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.policies import ENV_POLICY_MAP
from pydantic import ValidationError

from envs import (
    TASK_PROMPTS,
    EnvConfig,
    GymAdapterEnv,
    GymEnvConfig,
    MetaWorldEnv,
    ScriptedExpert,
    SimulatedHumanConfig,
    UnknownTaskError,
    make_env,
    resolve_task,
    task_max_episode_steps,
)
from envs.metaworld_env import PRIVILEGED_PARTS
from envs.rendering import camera_is_upside_down, orient
from policies.base import stack_observations

UPRIGHT_CHECK_CAMERAS = ("corner", "corner2", "corner3", "corner4", "behindGripper")


@pytest.fixture
def pick_place_env():
    config = EnvConfig(task="pick-place-v3", cameras=("corner2", "gripperPOV"), width=64, height=48)
    env = MetaWorldEnv(config)
    yield env
    env.close()


def test_observation_dict_has_the_contracted_shapes_and_dtypes(pick_place_env):
    obs, info = pick_place_env.reset(seed=3)
    assert set(obs["images"]) == {"corner2", "gripperPOV"}
    for image in obs["images"].values():
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
        assert image.std() > 5, "a rendered camera image should not be blank"
    assert obs["state"].shape == (7,) and obs["state"].dtype == np.float32
    assert obs["privileged"].shape == (39,) and obs["privileged"].dtype == np.float32
    assert obs["prompt"] == TASK_PROMPTS["pick-place-v3"]
    assert info["success"] is False
    assert pick_place_env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = pick_place_env.step(np.zeros(4, dtype=np.float32))
    assert isinstance(info["success"], bool) and isinstance(reward, float)
    assert not terminated and not truncated
    assert pick_place_env.observation_space.contains(obs)
    assert stack_observations([obs, obs])["images"]["corner2"].shape == (2, 48, 64, 3)
    quality = pick_place_env.unwrapped_sim.model.vis.quality
    assert (quality.shadowsize, quality.offsamples) == (0, 0), "fast rendering: no shadows, no multisampling"


def test_state_is_hand_gripper_and_goal_from_the_privileged_vector(pick_place_env):
    obs, _ = pick_place_env.reset(seed=1)
    expected = obs["privileged"][[0, 1, 2, 3, 36, 37, 38]]
    np.testing.assert_array_equal(obs["state"], expected)
    assert np.linalg.norm(obs["state"][4:]) > 0.1, "the goal must be observable (not Meta-World's zeros)"
    env = MetaWorldEnv(EnvConfig(task="reach-v3", render=False, state_parts=("hand", "gripper")))
    obs, _ = env.reset()
    assert obs["state"].shape == (4,) and obs["images"] == {}
    env.close()


def test_state_parts_pick_the_object_or_the_full_observation_in_the_order_given():
    env = MetaWorldEnv(
        EnvConfig(task="pick-place-v3", render=False, state_parts=("object", "hand", "gripper", "goal"))
    )
    obs, _ = env.reset(seed=2)
    np.testing.assert_array_equal(obs["state"], obs["privileged"][[4, 5, 6, 0, 1, 2, 3, 36, 37, 38]])
    assert env.observation_space.contains(obs) and np.linalg.norm(obs["state"][:3]) > 0.1, (
        "the object's position"
    )
    env.close()
    env = MetaWorldEnv(EnvConfig(task="pick-place-v3", render=False, state_parts=PRIVILEGED_PARTS))
    obs, _ = env.reset(seed=2)
    np.testing.assert_array_equal(obs["state"], obs["privileged"])
    env.close()
    with pytest.raises(ValueError, match="state_parts: unknown part 'elbow'"):
        EnvConfig(state_parts=("hand", "elbow"))
    with pytest.raises(ValueError, match="state_parts: expected distinct parts"):
        EnvConfig(state_parts=("hand", "hand"))


@pytest.mark.parametrize("camera", UPRIGHT_CHECK_CAMERAS)
def test_camera_images_are_upright_and_not_mirrored(pick_place_env, camera):
    """Per visible geom: higher in the world → higher in the image; further camera-right → further right."""
    pick_place_env.reset(seed=0)
    sim = pick_place_env.unwrapped_sim
    model, data = sim.model, sim.data
    renderer = mujoco.Renderer(model, height=96, width=128)
    try:
        renderer.enable_segmentation_rendering()
        renderer.update_scene(data, camera=camera)
        segmentation = orient(renderer.render(), camera_is_upside_down(model, data, camera))
    finally:
        renderer.close()
    ids, types = segmentation[..., 0], segmentation[..., 1]
    geom_pixels = {g: (ids == g) & (types == int(mujoco.mjtObj.mjOBJ_GEOM)) for g in np.unique(ids)}
    small = [g for g, mask in geom_pixels.items() if 0 < mask.mean() < 0.1]  # one vote per object
    assert len(small) >= 8
    rows = [np.nonzero(geom_pixels[g])[0].mean() for g in small]
    cols = [np.nonzero(geom_pixels[g])[1].mean() for g in small]
    camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    forward = -data.cam_xmat[camera_id].reshape(3, 3)[:, 2]
    right = np.cross(forward, [0.0, 0.0, 1.0])
    heights = data.geom_xpos[small, 2]
    rightness = (data.geom_xpos[small] - data.cam_xpos[camera_id]) @ right
    assert np.corrcoef(rows, heights)[0, 1] < -0.5
    assert np.corrcoef(cols, rightness)[0, 1] > 0.5


def test_env_images_are_the_raw_render_rotated_for_corner_cameras(pick_place_env):
    obs, _ = pick_place_env.reset(seed=0)
    sim = pick_place_env.unwrapped_sim
    renderer = mujoco.Renderer(sim.model, height=48, width=64)
    try:
        raws = {}
        for camera in ("corner2", "gripperPOV"):
            renderer.update_scene(sim.data, camera=camera)
            raws[camera] = renderer.render()
    finally:
        renderer.close()
    np.testing.assert_array_equal(obs["images"]["corner2"], raws["corner2"][::-1, ::-1])
    np.testing.assert_array_equal(obs["images"]["gripperPOV"], raws["gripperPOV"])


def test_unknown_task_error_lists_the_closest_names():
    with pytest.raises(UnknownTaskError, match="pick-place-v3") as error:
        resolve_task("pick_place")
    assert str(error.value).startswith("task: unknown Meta-World task 'pick_place'")
    with pytest.raises(ValidationError, match="closest names: push-v3"):
        EnvConfig(task="push-v2")


def test_bad_config_values_name_the_field():
    with pytest.raises(ValidationError, match="width"):
        EnvConfig(width=4)
    with pytest.raises(ValidationError, match="colour"):
        EnvConfig(colour="red")
    with pytest.raises(ValidationError, match="distinct camera"):
        EnvConfig(cameras=("corner2", "corner2"))
    with pytest.raises(ValueError, match="unknown camera 'frontview'"):
        MetaWorldEnv(EnvConfig(cameras=("frontview",)))


def test_every_mt50_task_has_a_prompt_an_expert_and_an_episode_length():
    assert set(TASK_PROMPTS) == set(ALL_V3_ENVIRONMENTS) == set(ENV_POLICY_MAP)
    assert len(TASK_PROMPTS) == 50 and len(set(TASK_PROMPTS.values())) == 50
    assert task_max_episode_steps("reach-v3") == 200 and task_max_episode_steps("push-back-v3") == 500


def test_seeds_reproduce_scenes_and_images():
    config = EnvConfig(task="push-v3", width=32, height=32, seed=11)
    first, second = MetaWorldEnv(config), MetaWorldEnv(config)
    try:
        obs_a, _ = first.reset()
        obs_b, _ = second.reset()
        np.testing.assert_array_equal(obs_a["privileged"], obs_b["privileged"])
        for _ in range(3):
            obs_a, *_ = first.step(np.array([0.5, -0.2, 0.1, 1.0]))
            obs_b, *_ = second.step(np.array([0.5, -0.2, 0.1, 1.0]))
        np.testing.assert_array_equal(obs_a["images"]["corner2"], obs_b["images"]["corner2"])
        same, _ = first.reset(seed=11)
        other, _ = first.reset(seed=12)
        np.testing.assert_array_equal(same["privileged"], obs_b_initial(config))
        assert not np.array_equal(same["privileged"][4:7], other["privileged"][4:7])
        continued_a, _ = first.reset()
        second.reset(seed=12)
        continued_b, _ = second.reset()
        np.testing.assert_array_equal(continued_a["privileged"], continued_b["privileged"])
        assert not np.array_equal(continued_a["privileged"][4:7], other["privileged"][4:7])
    finally:
        first.close()
        second.close()


def obs_b_initial(config: EnvConfig) -> np.ndarray:
    """The privileged observation of the first reset of a fresh image-free env with ``config``."""
    env = MetaWorldEnv(config.model_copy(update={"render": False}))
    obs, _ = env.reset()
    env.close()
    return obs["privileged"]


def test_episodes_truncate_at_max_steps_and_terminate_on_success():
    env = MetaWorldEnv(EnvConfig(task="reach-v3", render=False, max_episode_steps=5))
    env.reset(seed=0)
    for step in range(5):
        _, _, terminated, truncated, _ = env.step(np.zeros(4))
        assert truncated == (step == 4) and not terminated
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(4))
    env.close()
    env = MetaWorldEnv(EnvConfig(task="reach-v3", render=False, reward="sparse"))
    expert = ScriptedExpert("reach-v3")
    obs, _ = env.reset(seed=0)
    rewards = []
    for _ in range(env.max_episode_steps):
        obs, reward, terminated, truncated, info = env.step(expert.act(obs["privileged"]))
        rewards.append(reward)
        if terminated or truncated:
            break
    assert terminated and info["success"] and rewards[-1] == 1.0 and sum(rewards) == 1.0
    assert info["dense_reward"] > 0
    env.close()


def test_a_tighter_success_tolerance_asks_for_more_than_metaworld_does():
    """The clean expert reaches Meta-World's 5 cm before it reaches 5 mm: the variant succeeds later, exactly
    when the hand-goal distance first drops to the tolerance."""
    first_success = {}
    for tolerance in (None, 0.005):
        config = EnvConfig(task="reach-v3", render=False, reward="sparse", success_tolerance=tolerance)
        env, expert = MetaWorldEnv(config), ScriptedExpert("reach-v3")
        obs, _ = env.reset(seed=3)
        steps, terminated, truncated = 0, False, False
        while not (terminated or truncated):
            obs, reward, terminated, truncated, info = env.step(expert.act(obs["privileged"]))
            steps += 1
        assert terminated and reward == 1.0
        first_success[tolerance] = steps
        env.close()
    distance = np.linalg.norm(obs["privileged"][0:3] - obs["privileged"][36:39])
    assert info["tolerance_distance"] == pytest.approx(distance, abs=1e-6) and distance <= 0.005
    assert info["metaworld_success"]
    assert first_success[0.005] > first_success[None]
    with pytest.raises(ValidationError, match="success_tolerance: supported for"):
        EnvConfig(task="peg-insert-side-v3", success_tolerance=0.01)
    with pytest.raises(ValidationError, match="success_tolerance"):
        EnvConfig(task="reach-v3", success_tolerance=0.0)


def test_generic_adapter_wraps_a_gymnasium_mujoco_env_by_configuration():
    config = GymEnvConfig(
        env_id="Pusher-v5", prompt="push the object to the goal", render=True, width=64, height=64, seed=5
    )
    env = GymAdapterEnv(config)
    try:
        obs, info = env.reset()
        assert obs["images"]["main"].shape == (64, 64, 3) and obs["images"]["main"].dtype == np.uint8
        assert obs["state"].shape == (23,) and obs["state"].dtype == np.float32
        assert obs["prompt"] == "push the object to the goal" and info["success"] is False
        assert env.observation_space.contains(obs)
        first_image = obs["images"]["main"].copy()
        for _ in range(10):
            obs, reward, _, _, info = env.step(np.full(7, 0.5, dtype=np.float32))
        assert isinstance(reward, float) and isinstance(info["success"], bool)
        assert not np.array_equal(first_image, obs["images"]["main"]), "the arm moved: the image must change"
        replay = GymAdapterEnv(config)
        replayed, _ = replay.reset()
        initial, _ = env.reset(seed=5)
        np.testing.assert_array_equal(replayed["state"], initial["state"])
        replay.close()
    finally:
        env.close()


def test_generic_adapter_time_limit_and_bad_env_id():
    env = make_env(GymEnvConfig(env_id="Pusher-v5", max_episode_steps=7))
    env.reset()
    truncated = [env.step(env.action_space.sample())[3] for _ in range(7)]
    assert truncated == [False] * 6 + [True]
    env.close()
    with pytest.raises(ValidationError, match="closest names: Pusher-v"):
        GymEnvConfig(env_id="Pushr-v5")
    with pytest.raises(ValueError, match="need a Meta-World task"):
        make_env(GymEnvConfig(env_id="Pusher-v5"), SimulatedHumanConfig())


class FixedFrameEnv(gym.Env):
    """A gymnasium env whose frames have their own size (it takes no width/height) and that reports success."""

    metadata = {"render_modes": ["rgb_array"]}  # noqa: RUF012

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Dict(
            {"position": gym.spaces.Box(-1, 1, (2,)), "velocity": gym.spaces.Box(-1, 1, (1,))}
        )
        self.action_space = gym.spaces.Box(-1, 1, (1,))
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return {"position": np.zeros(2, np.float32), "velocity": np.ones(1, np.float32)}, {}

    def step(self, action):
        self._t += 1
        obs = {"position": np.full(2, 0.1 * self._t, np.float32), "velocity": np.ones(1, np.float32)}
        return obs, 1.0, self._t >= 3, False, {"is_success": self._t >= 3}

    def render(self):
        frame = np.zeros((10, 20, 3), np.uint8)
        frame[:, :10] = 255  # left half white
        return frame


def test_generic_adapter_flattens_dict_observations_and_resizes_frames():
    gym.register("FlywheelTest/FixedFrame-v0", entry_point=FixedFrameEnv)
    config = GymEnvConfig(
        env_id="FlywheelTest/FixedFrame-v0",
        render=True,
        width=40,
        height=20,
        camera="front",
        success_key="is_success",
    )
    env = make_env(config)
    obs, _ = env.reset()
    assert obs["images"]["front"].shape == (20, 40, 3)
    assert obs["images"]["front"][:, :18].min() == 255 and obs["images"]["front"][:, 22:].max() == 0
    np.testing.assert_array_equal(obs["state"], [0.0, 0.0, 1.0])  # Dict keys in sorted order, flattened
    assert obs["prompt"] == "FlywheelTest/FixedFrame-v0"
    successes = [env.step(np.zeros(1, np.float32))[4]["success"] for _ in range(3)]
    assert successes == [False, False, True]
    env.close()


def _on_another_thread(call):
    """``call()`` run on a fresh thread; its result (or the exception it raised)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except Exception as error:  # handed back to the test thread
            outcome["value"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return outcome["value"]


@pytest.mark.parametrize(
    "config",
    [
        EnvConfig(task="reach-v3", cameras=("corner2", "topview"), width=32, height=32),
        GymEnvConfig(env_id="Pusher-v5", render=True, width=32, height=32),
    ],
    ids=["metaworld", "gymnasium-mujoco"],
)
def test_an_env_built_on_one_thread_renders_and_closes_on_others(config):
    """What a Ray actor with two threads does: build here, step there, close from a third thread. A GL context
    left current on the first thread would fail with EGL_BAD_ACCESS or render black frames elsewhere."""
    env = make_env(config)
    here = env.reset(seed=3)[0]["images"]
    there = _on_another_thread(lambda: env.reset(seed=3)[0]["images"])
    assert not isinstance(there, Exception), there
    assert set(there) == set(here)
    for camera, image in here.items():
        assert image.std() > 5.0 and np.array_equal(there[camera], image), camera
    stepped = _on_another_thread(lambda: env.step(env.action_space.sample() * 0)[0]["images"])
    assert not isinstance(stepped, Exception), stepped
    assert _on_another_thread(env.close) is None
