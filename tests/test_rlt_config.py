"""RLT's settings, declared once in ``rlt.config``: validation names the field in one line, ``flywheel rlt`` builds
the same model from ``--config``, flags and ``--set``, and docs/rlt.md lists every key with its default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from experiments.commands.rlt import rlt_config
from experiments.validation import UserError, first_error
from rlt.config import LearnerConfig, OnlineConfig, OnlineSettings, RLTConfig

REPO = Path(__file__).resolve().parents[1]


def _error(model: type, **values: object) -> str:
    with pytest.raises(ValidationError) as error:
        model(**values)
    return first_error(error.value)


@pytest.mark.parametrize(
    ("model", "values", "message"),
    [
        (LearnerConfig, {"beta": -1.0}, "beta: Input should be greater than or equal to 0"),
        (LearnerConfig, {"actor_q": "max"}, "actor_q: Input should be 'q1', 'min' or 'mean'"),
        (LearnerConfig, {"net_arch": ()}, "net_arch: Tuple should have at least 1 item"),
        (LearnerConfig, {"net_arch": (64, 0)}, "net_arch.1: Input should be greater than 0"),
        (LearnerConfig, {"stride": 3}, "stride: expected a divisor of chunk_size 10, got 3"),
        (
            LearnerConfig,
            {"n_critics": 3, "target_critics": 4},
            "target_critics: expected ≤ n_critics (3), got 4",
        ),
        (LearnerConfig, {"beta_on": "residual"}, "beta_on: 'residual' needs residual_scale"),
        (LearnerConfig, {"betta": 1.0}, "betta: Extra inputs are not permitted"),
        (OnlineSettings, {"exploration_rho": 1.0}, "exploration_rho: Input should be less than 1"),
        (OnlineConfig, {"rl_version": "x"}, "task: Field required"),
        (RLTConfig, {"handoff": "elbow"}, "handoff: expected 'always' or a pair of"),
        (RLTConfig, {"handoff": "info:"}, "handoff: expected 'always' or a pair of"),
        (RLTConfig, {"handoff": "grasp_success"}, "handoff: expected 'always' or a pair of"),
        (
            RLTConfig,
            {"learner": {"utd_ratio": 0}},
            "learner.utd_ratio: Input should be greater than or equal to 1",
        ),
        (RLTConfig, {"utd_ratio": 5}, "utd_ratio: moved to learner.utd_ratio"),
        (RLTConfig, {"env_steps": 5}, "env_steps: moved to online.total_env_steps"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_it(model: type, values: dict, message: str) -> None:
    text = _error(model, **values)
    assert text.startswith(message) and "\n" not in text, text


def test_online_config_is_the_settings_plus_the_run() -> None:
    settings = OnlineSettings(total_env_steps=50, exploration="offset")
    config = OnlineConfig(**settings.model_dump(), task="reach-v3", seed=3)
    assert config.total_env_steps == 50 and config.exploration == "offset" and config.seed == 3
    assert set(OnlineConfig.model_fields) - set(OnlineSettings.model_fields) == {
        "task",
        "rl_version",
        "seed",
    }


def test_the_command_reads_a_file_then_flags_then_set(tmp_path) -> None:
    """A pipeline config's ``rlt:`` block (or a bare RLT block) is the base; typed flags and then ``--set``
    override it; YAML values parse (lists, null)."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text((REPO / "configs" / "tiny.yaml").read_text())
    config = rlt_config(
        pipeline, {"learner.beta": 0.3, "online.total_env_steps": 40}, ["online.total_env_steps=60"]
    )
    assert (config.z_dim, config.learner.chunk_size, config.learner.net_arch) == (16, 5, (32, 32))
    assert config.learner.beta == 0.3 and config.online.total_env_steps == 60
    block = tmp_path / "rlt.yaml"
    block.write_text("learner:\n  residual_scale: 0.5\n  beta_on: residual\n")
    config = rlt_config(block, {}, ["learner.net_arch=[64, 64, 64]", "learner.stride=null"])
    assert (config.learner.residual_scale, config.learner.net_arch) == (0.5, (64, 64, 64))
    assert rlt_config(None, {}, None) == RLTConfig()


@pytest.mark.parametrize(
    ("file_text", "overrides", "message"),
    [
        (None, ["learner.beta"], "--set learner.beta: expected KEY=VALUE"),
        (None, ["learner.beta=-2"], "learner.beta: Input should be greater than or equal to 0"),
        (None, ["online.eval_episodes=abc"], "online.eval_episodes: Input should be a valid integer"),
        (None, ["z_dim.x=1"], "z_dim: Input should be a valid integer"),
        (None, ["z_dim=4", "z_dim.x=1"], "z_dim.x: z_dim is a block of settings, not a value"),
        ("- 1\n- 2\n", [], "expected a mapping of RLT settings"),
        ("learner: [1\n", [], "--config"),
        ("beta: 0.5\n", [], "beta: moved to learner.beta"),
    ],
)
def test_bad_command_settings_are_one_user_error(tmp_path, file_text, overrides, message) -> None:
    path = None
    if file_text is not None:
        path = tmp_path / "rlt.yaml"
        path.write_text(file_text)
    with pytest.raises(UserError) as error:
        rlt_config(path, {}, overrides)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_docs_list_every_key_with_its_default() -> None:
    """docs/rlt.md's configuration table has a row per ``RLTConfig`` key (nested ones dotted) with its default."""
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", (REPO / "docs" / "rlt.md").read_text(), re.M))
    expected = {}
    for prefix, model in (("", RLTConfig), ("online.", OnlineSettings), ("learner.", LearnerConfig)):
        for name, field in model.model_fields.items():
            if name not in ("online", "learner"):
                default = field.default
                if default is None or isinstance(default, bool):
                    default = "null" if default is None else str(default).lower()
                expected[prefix + name] = str(list(default) if isinstance(default, tuple) else default)
    assert {key: rows.get(key) for key in expected} == expected


def test_an_info_handoff_is_a_setting_and_deploys_as_an_info_key_switch() -> None:
    from rlt.deployment import PriorSpec, RLTDeployment
    from rlt.phase import InfoKeySwitch

    config = RLTConfig(handoff="info:near_object")
    deployment = RLTDeployment.with_handoff("pick-place-v3", PriorSpec("v", 0.3, 0), config.handoff, 0.05)
    assert (deployment.handoff, deployment.handoff_distance) == ("info:near_object", 0.0)
    switch = deployment.switch()
    assert isinstance(switch, InfoKeySwitch) and switch.info_keys == ("near_object",)
    assert rlt_config(None, {"handoff": "info:grasp_success", "handoff_distance": 0.1}, []).handoff == (
        "info:grasp_success"
    )
