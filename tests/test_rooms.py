"""The rooms' import rules (docs/architecture.md, "Rooms and their imports"), read from the code with ``ast``, and
what a light start-up loads, checked in a fresh interpreter.

Rules: ``core/`` imports no room and nothing outside the standard library, numpy and msgpack; ``storage/``
imports no room but ``core/``; ``envs/`` and ``policies/`` never import ``storage/``, and ``policies/`` never
imports ``envs/`` (``ScriptedPolicy`` lives in ``envs/``: no room cycle); ``recap/`` and ``rlt/``
never import ``actors/`` or ``experiments/``; ``actors/`` never imports ``experiments/``. Imports inside
functions count too: a lazy import still ties the rooms together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("core", "storage", "envs", "policies", "actors", "recap", "rlt", "experiments")

#: room → rooms it must never import.
FORBIDDEN: dict[str, set[str]] = {
    "core": set(ROOMS) - {"core"},
    "storage": set(ROOMS) - {"core", "storage"},
    "envs": {"storage", "actors", "recap", "rlt", "experiments"},
    "policies": {"storage", "envs", "actors", "recap", "rlt", "experiments"},
    "recap": {"actors", "experiments"},
    "rlt": {"actors", "experiments"},
    "actors": {"experiments"},
}

#: Libraries whose import a light start-up must not pay for (seconds of CPU each, together ~5 s).
HEAVY = ("torch", "mujoco", "metaworld", "ray", "mlflow")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def room_violations(room: str) -> list[str]:
    """``file: imports module`` for each import of a forbidden room by a file of ``room``."""
    found = []
    for path in sorted((REPO / room).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if module.split(".")[0] in FORBIDDEN[room]:
                found.append(f"{path.relative_to(REPO)}: imports {module}")
    return found


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports_follow_the_rules(room: str) -> None:
    assert room_violations(room) == []


def test_core_needs_only_numpy_and_msgpack() -> None:
    allowed = set(sys.stdlib_module_names) | {"numpy", "msgpack", "core"}
    outside = {
        f"{path.relative_to(REPO)}: {module}"
        for path in (REPO / "core").rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] not in allowed
    }
    assert outside == set()


def test_the_rule_check_sees_a_forbidden_import(tmp_path, monkeypatch) -> None:
    """The checker is not vacuous: a storage module importing a policy is reported."""
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "bad.py").write_text("def f():\n    from policies.base import Policy\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert room_violations("storage") == ["storage/bad.py: imports policies.base"]


def module_graph() -> dict[str, set[str]]:
    """Module → the repository modules it imports (anywhere in the file, type-checking imports included)."""
    modules = {}
    for room in ROOMS:
        for path in (REPO / room).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for module in imported_modules(path):
            parts = module.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                graph[name].add(".".join(parts))
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                groups.append(sorted([node, *group]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycles_between_files() -> None:
    assert import_cycles(module_graph()) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def loaded_after(code: str) -> tuple[set[str], str]:
    """The top-level modules loaded in a fresh interpreter after running ``code`` (one line; a ``SystemExit``
    is ignored), and what it printed."""
    loaded = "' '.join(sorted({m.split('.')[0] for m in sys.modules}))"
    probe = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\nprint({loaded}, file=sys.stderr)"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    return set(done.stderr.split()), done.stdout


def test_flywheel_help_loads_no_heavy_library() -> None:
    """``flywheel --help`` (every command module imported, none run) stays free of torch, mujoco, Ray, MLflow:
    commands import those inside their functions (experiments/cli.py's docstring)."""
    loaded, shown = loaded_after("sys.argv = ['flywheel', '--help']; from experiments.cli import app; app()")
    assert "collect" in shown and "robot" in shown  # the commands were mounted
    assert loaded & set(HEAVY) == set()


#: A robot spooling one episode: the record is validated (column limits included) before it is encoded.
ROBOT_SPOOLS_AN_EPISODE = """
import sys, tempfile, uuid
import numpy as np
import actors.robot, actors.robot_runtime, actors.upload
from storage.records import EpisodeRecord
from storage.spool import EpisodeSpool

T = 3
record = EpisodeRecord(
    uuid=uuid.uuid4(), task="reach-v3", env_id="robot", policy_version=None, seed=2**40, outcome="success",
    states=np.zeros((T, 4), np.float32), actions=np.zeros((T, 2), np.float32), rewards=np.zeros(T, np.float32),
    terminated=np.zeros(T, bool), truncated=np.zeros(T, bool), sources=np.zeros(T, np.uint8),
    policy_versions=[None] * T, chunk_ids=np.full(T, -1, np.int32), chunk_offsets=np.zeros(T, np.int32),
    latency_ms=np.zeros(T, np.float32), chunks=np.zeros((0, 1, 2), np.float32),
    images={"wrist": np.zeros((T, 8, 8, 3), np.uint8)}, subtasks=["reach"] * T, prompt="reach",
)
print(EpisodeSpool(tempfile.mkdtemp() + "/spool.db").put(record))
"""


def test_robot_side_imports_without_torch_mujoco_or_sqlalchemy(tmp_path) -> None:
    """A robot computer runs the control loop, the robot interface and the uploader with numpy, pydantic and
    websockets: importing them, and spooling an episode (validated against the store's column limits first),
    loads no torch, mujoco/Meta-World, sqlalchemy, Ray or MLflow."""
    script = tmp_path / "robot.py"
    script.write_text(ROBOT_SPOOLS_AN_EPISODE)
    loaded, shown = loaded_after(f"exec(open({str(script)!r}).read())")
    assert "actors" in loaded and shown.strip() == "True"
    assert loaded & {*HEAVY, "sqlalchemy"} == set()


def test_cli_error_names_resolve_to_exception_classes() -> None:
    """The CLI names the errors it reports in one line by string (so matching them imports nothing); a typo
    there would silently turn bad input into a traceback."""
    import importlib

    from experiments.cli import RUN_FAILURES, USER_ERRORS

    for name in USER_ERRORS + RUN_FAILURES:
        module, _, qualname = name.rpartition(".")
        error = getattr(importlib.import_module(module), qualname)
        assert issubclass(error, Exception) and f"{error.__module__}.{error.__qualname__}" == name
