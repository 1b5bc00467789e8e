"""``flywheel envs``: task listing, rendering to PNG, expert check, and a one-line error for a bad task."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from experiments.cli import app as flywheel
from experiments.commands.envs import app

runner = CliRunner()


def test_list_shows_every_task_with_its_prompt():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "pick-place-v3" in result.output and "pick up the puck and place it at the goal" in result.output
    assert "window-close-v3" in result.output


def test_render_writes_the_cameras_side_by_side(tmp_path):
    out = tmp_path / "frame.png"
    result = runner.invoke(
        app,
        ["render", "--task", "reach-v3", "--cameras", "corner2,topview", "--size", "32", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 64, 3) and image.std() > 5


def test_expert_reports_success_and_a_bad_task_is_one_clear_line():
    result = runner.invoke(app, ["expert", "--task", "reach-v3", "--episodes", "2"])
    assert result.exit_code == 0 and "2/2 successes" in result.output
    result = runner.invoke(flywheel, ["envs", "expert", "--task", "reach-v9"])  # the CLI reports bad input
    assert result.exit_code == 2
    assert result.output.startswith(
        "error: task: unknown Meta-World task 'reach-v9'; closest names: reach-v3"
    )
    assert result.output.count("\n") == 1
