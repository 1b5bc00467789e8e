"""RLT over the built-in image VLA: its real prefix embeddings through the RL token (issue 19 item 5).

Per seed, in one SQLite store: ``--demos`` noisy scripted demonstrations of the task from one camera
(``--camera``, ``--image-size`` px) + state → the built-in tiny VLA trained by BC on them for ``--prior-steps``
(``experiments.training.train_vla``, what ``flywheel train bc --size tiny`` runs; the image tier's prior of
``benchmarks/recap_scenarios.py``) → for each arm one run of the pipeline's RLT stage around that checkpoint
(``experiments.pipeline_rlt.run_rlt``, what ``flywheel rlt --prior <checkpoint>`` runs: the VLA's final prefix
embeddings at every chunk start → RL token → chunked actor-critic) → the prior and the arm evaluated on the same
``--eval-episodes`` seeds. Arms:

- ``rlt``: residual mode with the positive control's best learner (``benchmarks/rlt_positive_control.py``, lab
  notebook): residual scale 1.0, β 4 on the residual's mean square, no reference dropout, UTD 10 after 5,000
  critic-only updates, per-chunk offset exploration σ 0.1, 3-step returns;
- ``regression``: the critic-free ablation (``q_weight`` 0: regression toward ``ã`` with reference dropout, β 4
  mean), same state, data budget and exploration.

``--token-normalization position`` fits the RL token with statistics per position and channel instead of per
channel (``rlt.rl_token.fit_rl_token``; result files are tagged ``token-<normalization>``).

Also measured: the RL token's reconstruction MSE on held-out prior episodes (per-channel standardized embeddings)
beside the part of their variance that depends on the observation, how well ``z_rl`` predicts the state
linearly, wall time and env steps per second. One JSON per (task, arm, seed) under
``--output`` is written when it lands; ``--combine`` pools them (``--retoken`` recomputes a file's token block).

    python benchmarks/rlt_vla.py --task reach-v3 --seeds 0 1 --arms rlt regression
    python benchmarks/rlt_vla.py --combine benchmarks/results/rlt_vla_reach-v3_*_seed*.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch
from scipy import stats

from envs import EnvConfig, EnvSettings, MetaWorldEnv
from experiments.collection import collect_scripted_demos
from experiments.evaluation import wilson_interval
from experiments.pipeline_rlt import RLTResult, RLTStage, run_rlt
from experiments.policy_loader import load, resolve
from experiments.training import BCConfig, train_vla
from policies.base import Policy, stack_observations
from rlt.checkpoint import load_rlt_checkpoint
from rlt.config import RLTConfig
from rlt.deployment import PriorSpec
from rlt.rl_token import RLToken
from storage import EpisodeQuery, ExperienceStore

#: Seeds of the held-out episodes the RL token's reconstruction is measured on (no run plays them).
HELDOUT_SEED_BASE = 900_000


@dataclass(frozen=True)
class VLABenchConfig:
    """The task, the VLA prior's data and budget, and the RLT run's budget and learner settings."""

    task: str = "reach-v3"
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = ("rlt", "regression")
    camera: str = "corner2"
    image_size: int = 64
    episode_steps: int = 100
    success_tolerance: float | None = None
    demos: int = 10
    demo_noise: float = 0.1
    prior_steps: int = 150
    env_steps: int = 10_000
    warmup_episodes: int = 20
    eval_every: int = 0
    curve_episodes: int = 10
    eval_episodes: int = 50
    token_steps: int = 400
    token_batch_size: int = 32
    z_dim: int = 32
    token_normalization: str = "channel"
    heldout_episodes: int = 30
    residual_scale: float = 1.0
    beta: float = 4.0
    utd_ratio: int = 10
    critic_warmup_updates: int = 5000
    exploration: str = "offset"
    exploration_noise: float = 0.1
    n_step: int = 3
    workdir: str = "/tmp/flywheel-rlt-vla"
    output: str = "benchmarks/results"

    def env(self) -> EnvConfig:
        """The task as the VLA sees it (camera + state), sparse reward, success terminates."""
        size = self.image_size
        return EnvConfig(
            task=self.task,
            cameras=(self.camera,),
            width=size,
            height=size,
            reward="sparse",
            terminate_on_success=True,
            max_episode_steps=self.episode_steps,
            success_tolerance=self.success_tolerance,
        )

    def rlt(self, arm: str) -> RLTConfig:
        """The RLT stage's settings for ``arm``: RLT from the first chunk (no hand-off)."""
        online = {
            "warmup_episodes": self.warmup_episodes,
            "total_env_steps": self.env_steps,
            "eval_every_steps": self.eval_every,
            "eval_episodes": self.curve_episodes,
            "token_steps": self.token_steps,
            "token_batch_size": self.token_batch_size,
            "exploration": self.exploration,
            "exploration_noise": self.exploration_noise,
        }
        shared = {
            "utd_ratio": self.utd_ratio,
            "n_step": self.n_step,
            "beta": self.beta,
            "beta_reduction": "mean",
        }
        if arm == "regression":
            learner = shared | {"q_weight": 0.0}
        else:
            learner = shared | {
                "residual_scale": self.residual_scale,
                "beta_on": "residual",
                "ref_dropout": 0.0,
                "critic_warmup_updates": self.critic_warmup_updates,
            }
        return RLTConfig.model_validate(
            {
                "handoff": "always",
                "z_dim": self.z_dim,
                "token_normalization": self.token_normalization,
                "online": online,
                "learner": learner | {"device": "cpu"},
            }
        )


def train_prior(config: VLABenchConfig, seed: int, folder: Path) -> Path:
    """The VLA prior of ``seed`` (demos → BC), trained once into ``folder`` and reused by every arm."""
    done = folder / "prior.json"
    if done.exists():
        return Path(json.loads(done.read_text())["checkpoint"])
    folder.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{folder / 'store.db'}"
    collect_scripted_demos(config.env(), url, "demos", config.demos, config.demo_noise, seed=seed)
    settings = EnvSettings(cameras=(config.camera,), image_size=config.image_size)
    bc = BCConfig(env=settings, steps=config.prior_steps, seed=seed, checkpoint_every=0, device="cpu")
    selection = EpisodeQuery(tasks=[config.task], run_ids=["demos"])
    trained = train_vla(ExperienceStore(url), selection, bc, folder / "prior", progress=False)
    done.write_text(json.dumps({"checkpoint": str(trained.checkpoint), "version": trained.version}))
    return trained.checkpoint


def run_arm(config: VLABenchConfig, arm: str, seed: int) -> dict[str, Any]:
    """One RLT stage of ``arm`` around the seed's VLA prior; its numbers as a JSON-able dict."""
    torch.set_num_threads(1)
    folder = Path(config.workdir) / f"{config.task}-seed{seed}"
    checkpoint = train_prior(config, seed, folder)
    store = ExperienceStore(f"sqlite:///{folder / 'store.db'}")
    prior = load(resolve(str(checkpoint), store), task=config.task, store=store, seed=seed)
    version = f"rlt-vla-{arm}-{config.task}-seed{seed}-{int(time.time())}"
    stage = RLTStage(
        store,
        PriorSpec(prior.version, None, seed),
        lambda _: prior,
        config.env(),
        config.rlt(arm),
        version=version,
        run_id=version,
        folder=folder / version,
        seed=seed,
        final_eval_episodes=config.eval_episodes,
    )
    started = time.perf_counter()
    result = run_rlt(stage)
    wall = time.perf_counter() - started
    token = load_rlt_checkpoint(result.checkpoint).token
    row = _row(config, arm, seed, prior, result, wall) | {"checkpoint": str(result.checkpoint)}
    return row | {"token": token_report(config, prior, token)}


def _row(
    config: VLABenchConfig, arm: str, seed: int, prior: Policy, result: RLTResult, wall: float
) -> dict[str, Any]:
    manifest = result.manifest
    evaluation = manifest.evaluation
    n = evaluation.episodes
    successes = {"prior": evaluation.prior_success, arm: evaluation.rlt_success}
    return {
        "task": config.task,
        "arm": arm,
        "seed": seed,
        "prior_version": prior.version,
        "eval_episodes": n,
        "success": {
            name: {
                "rate": rate,
                "successes": round(rate * n),
                "wilson95": list(wilson_interval(round(rate * n), n)),
            }
            for name, rate in successes.items()
        },
        **manifest.model_dump(mode="json", include={"curve", "critic_calibration"}),
        "env_steps": manifest.env_steps,
        "online_episodes": manifest.online_episodes,
        "updates": manifest.updates,
        "wall_s": wall,
        "env_steps_per_s": manifest.env_steps / wall,
        "config": asdict(config),
    }


def token_report(config: VLABenchConfig, prior: Policy, token: RLToken) -> dict[str, Any]:
    """The trained token's shape and what it keeps of the prior's chunk-start embeddings in ``heldout_episodes``
    fresh episodes.

    ``heldout_mse``: its reconstruction MSE on per-channel standardized embeddings (the fit's own loss).
    ``channel_mean_mse`` is what predicting each channel's mean scores (~1), but most of that variance is
    across the ``T`` positions (patch, state and text tokens differ), which the decoder's position queries
    reproduce without ``z_rl``; ``position_mean_mse`` (predicting each position's mean over these chunks) is the
    variance that depends on the observation, the part ``z_rl`` has to carry. ``state_r2``: R² of a
    least-squares map from ``z_rl`` to each entry of the observation's ``state`` (fit on the first half of the
    chunks, scored on the second)."""
    embeddings, states = heldout_embeddings(config, prior)
    data = torch.as_tensor(embeddings, dtype=torch.float32)
    with torch.no_grad():
        mse = float(token.reconstruction_loss(data))
        normalized = (data - token.embed_mean) / token.embed_std
        channel_mse = float(torch.mean(normalized**2))
        position_mse = float(torch.mean((normalized - normalized.mean(0)) ** 2))
        z = token.encode(data).numpy()
    shape = {
        "num_tokens": token.config.num_tokens,
        "embed_dim": token.config.embed_dim,
        "z_dim": token.config.z_dim,
    }
    return shape | {
        "heldout_episodes": config.heldout_episodes,
        "heldout_chunks": len(embeddings),
        "heldout_mse": mse,
        "channel_mean_mse": channel_mse,
        "position_mean_mse": position_mse,
        "state_r2": linear_r2(z, states),
    }


def linear_r2(features: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per target column: R² on the second half of the rows of a least-squares fit (with bias) on the first."""
    half = len(features) // 2
    design = np.hstack([features, np.ones((len(features), 1))])
    weights = np.linalg.lstsq(design[:half], targets[:half], rcond=None)[0]
    residual = targets[half:] - design[half:] @ weights
    spread = np.maximum(((targets[half:] - targets[half:].mean(0)) ** 2).sum(0), 1e-12)
    return (1.0 - (residual**2).sum(0) / spread).tolist()


def heldout_embeddings(config: VLABenchConfig, prior: Policy) -> tuple[np.ndarray, np.ndarray]:
    """The prior's embeddings and the observation's ``state`` at every chunk start of ``heldout_episodes``
    episodes it plays itself."""
    env = MetaWorldEnv(config.env())
    embeddings, states = [], []
    for episode in range(config.heldout_episodes):
        observation, _ = env.reset(seed=HELDOUT_SEED_BASE + episode)
        done = False
        while not done:
            chunk = prior.infer(stack_observations([observation]))
            embeddings.append(chunk.embeddings[0])
            states.append(observation["state"])
            for action in chunk.actions[0, : prior.action_horizon]:
                observation, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
                if done:
                    break
    env.close()
    return np.stack(embeddings), np.stack(states)


def retoken(config: VLABenchConfig, path: Path) -> None:
    """Recompute a result file's ``token`` block from its run's checkpoint (found under ``config.workdir``) on
    ``config.heldout_episodes`` episodes."""
    row = json.loads(path.read_text())
    folder = Path(config.workdir) / f"{row['task']}-seed{row['seed']}"
    checkpoint = row.get("checkpoint") or str(max(folder.glob(f"rlt-vla-{row['arm']}-{row['task']}-seed*-*")))
    store = ExperienceStore(f"sqlite:///{folder / 'store.db'}")
    prior_checkpoint = json.loads((folder / "prior.json").read_text())["checkpoint"]
    prior = load(resolve(prior_checkpoint, store), task=row["task"], store=store, seed=row["seed"])
    heldout = replace(config, task=row["task"], success_tolerance=row["config"]["success_tolerance"])
    token = load_rlt_checkpoint(Path(checkpoint)).token
    row |= {"checkpoint": checkpoint, "token": token_report(heldout, prior, token)}
    path.write_text(json.dumps(row, indent=1))


def result_path(config: VLABenchConfig, arm: str, seed: int) -> Path:
    """Where the (task, arm, seed) result lands."""
    tolerance = f"_tol{config.success_tolerance:g}" if config.success_tolerance else ""
    name = f"rlt_vla_{config.task}{tolerance}_token-{config.token_normalization}_{arm}_seed{seed}.json"
    return Path(config.output) / name


def combine(paths: list[Path]) -> str:
    """Per arm and token normalization over the result files: pooled successes with a Wilson interval, mean ± t 95% interval over seeds
    of the arm minus the prior (same seeds), the token's held-out MSE beside the observation-dependent part of the
    variance (``position_mean_mse``), the mean R² of ``z_rl`` → state, wall time and env steps/s."""
    rows = [json.loads(path.read_text()) for path in paths]
    lines = [f"{'arm / token':<20} {'seeds':>5} {'prior':>22} {'arm':>22} {'Δ mean ± t95':>14} {'token mse':>10} "
             f"{'obs var':>8} {'z→s R²':>7} {'wall min':>8} {'steps/s':>7}"]  # fmt: skip
    for label in sorted({_label(row) for row in rows}):
        runs = [row for row in rows if _label(row) == label]
        arm = runs[0]["arm"]
        cells = [
            _pooled([run["success"][name] for run in runs], runs[0]["eval_episodes"])
            for name in ("prior", arm)
        ]
        deltas = [run["success"][arm]["rate"] - run["success"]["prior"]["rate"] for run in runs]
        lines.append(
            f"{label:<20} {len(runs):>5} {cells[0]:>22} {cells[1]:>22} {_t_interval(deltas):>14} "
            f"{np.mean([r['token']['heldout_mse'] for r in runs]):>10.3f} "
            f"{np.mean([r['token']['position_mean_mse'] for r in runs]):>8.3f} "
            f"{np.mean([np.mean(r['token']['state_r2']) for r in runs]):>7.2f} "
            f"{np.mean([r['wall_s'] for r in runs]) / 60:>8.1f} {np.mean([r['env_steps_per_s'] for r in runs]):>7.1f}"
        )
        lines.append("  per seed (prior → arm): " + ", ".join(
            f"{run['seed']}: {run['success']['prior']['rate']:.2f} → {run['success'][arm]['rate']:.2f}" for run in runs
        ))  # fmt: skip
    return "\n".join(lines)


def _label(row: dict[str, Any]) -> str:
    """``arm / token normalization`` of a result row (files written before the setting: per channel)."""
    return f"{row['arm']} / {row['config'].get('token_normalization', 'channel')}"


def _pooled(cells: list[dict[str, Any]], n: int) -> str:
    successes, total = sum(cell["successes"] for cell in cells), n * len(cells)
    low, high = wilson_interval(successes, total)
    return f"{successes}/{total} {successes / total:.2f} [{low:.2f}, {high:.2f}]"


def _t_interval(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.2f}"
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return f"{np.mean(values):+.2f} ± {half:.2f}"


def main(config: VLABenchConfig) -> None:
    """Every arm for every seed, each result written as it lands, then the pooled table."""
    paths = []
    for seed in config.seeds:
        for arm in config.arms:
            path = result_path(config, arm, seed)
            if not path.exists():
                row = run_arm(config, arm, seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row, indent=1))
            paths.append(path)
            print(combine([path]), flush=True)
    print(combine(paths))


def parse_args() -> tuple[VLABenchConfig, argparse.Namespace]:
    """Flags → the benchmark's config (every ``VLABenchConfig`` field is a flag), and the ``--combine`` /
    ``--retoken`` files."""
    defaults = VLABenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            kind = int if name == "seeds" else str
            parser.add_argument(flag, type=kind, nargs="+", default=list(value))
        else:
            kind = float if name == "success_tolerance" else type(value)
            parser.add_argument(flag, type=kind, default=value)
    parser.add_argument("--combine", type=Path, nargs="+", default=[], help="pool these result files instead")
    parser.add_argument(
        "--retoken",
        type=Path,
        nargs="+",
        default=[],
        help="recompute these result files' token block instead",
    )
    args = vars(parser.parse_args())
    files = argparse.Namespace(combine=args.pop("combine"), retoken=args.pop("retoken"))
    args["seeds"], args["arms"] = tuple(args["seeds"]), tuple(args["arms"])
    return VLABenchConfig(**args), files


if __name__ == "__main__":
    benchmark, files = parse_args()
    for result in files.retoken:
        retoken(benchmark, result)
    if files.combine:
        print(combine(files.combine))
    elif not files.retoken:
        main(benchmark)
