"""Positive control for RLT's learner (issue 19 item 3): pick-place-v3 from a 10-demo state-MLP BC prior.

The prior is a small MLP trained by MSE behaviour cloning to emit a ``C``-step chunk from the 39-D state, on
``demos`` successful episodes of Meta-World's scripted expert with Gaussian action noise (``demo_noise``).
Arms, on the same evaluation seeds (``rlt_sample_efficiency.eval_seeds``):

- ``prior``: the frozen BC prior;
- ``oracle`` (known answer): the prior's chunk moved toward the clean expert's zero-order-hold chunk by at most
  the residual scale per entry — how far a residual actor of that scale could go (``ExpertResidual``);
- ``rlt``: ``rlt.online.OnlineRLT`` (played by ``actors.rlt_loop.RLTLoop``) in residual mode over the whole episode (no hand-off) with no RL token
  (``x`` = the 39-D state): ``clip(ã + s·π(x, ã))`` with the regularizer β on the residual's mean square,
  ``utd_ratio`` critic updates per executed chunk, the first ``critic_warmup_updates`` critic-only;
- ``regression``: the same loop with ``q_weight = 0`` and the actor predicting the chunk itself (RLT's
  critic-free ablation: regression toward ``ã`` with 50% reference dropout).

Each (arm, seed) is written to ``<output>/rlt_positive_control_<task>_<arm>_seed<seed>.json`` as it lands (a
finished file is reused, so seeds accumulate over runs); the summary prints mean ± 95% t-interval per point.

    python benchmarks/rlt_positive_control.py --seeds 0 --arms prior rlt regression
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch
from rlt_sample_efficiency import (
    BenchmarkConfig,
    Curve,
    Demo,
    PointHook,
    collect_demos,
    demo_records,
    eval_seeds,
    learner_episodes,
    load_result,
    make_env,
    plot,
    print_curve,
    print_summary,
    prior_episode,
    run_reporting,
    summarize,
    training_windows,
    write_result,
)

from actors.rlt_loop import RLTLoop
from envs.experts import ScriptedExpert
from policies.base import ActionChunk, ObservationBatch
from rlt.online import OnlineRLT
from rlt.phase import AlwaysCritical
from rlt.state import EmbeddingPrior, StateProjectionEmbedder
from rlt.td3 import LearnerConfig
from storage.records import EpisodeRecord

STATE_DIM = 39
#: Arms without learning: the prior, and the known answer (the prior + the expert's correction within ±s).
FROZEN_ARMS = ("prior", "oracle")


@dataclass(frozen=True)
class ControlConfig:
    """The positive control's task, prior, budget and the RLT arm's learner settings."""

    task: str = "pick-place-v3"
    seeds: tuple[int, ...] = (0,)
    arms: tuple[str, ...] = ("prior", "rlt", "regression")
    demos: int = 10
    demo_noise: float = 0.3
    bc_steps: int = 3000
    chunk_size: int = 10
    episode_steps: int = 200
    env_steps: int = 140_000
    warmup_episodes: int = 20
    eval_every: int = 20_000
    eval_episodes: int = 30
    residual_scale: float = 0.5
    beta: float = 1.0
    utd_ratio: int = 10
    critic_warmup_updates: int = 5000
    exploration_noise: float = 0.2
    exploration: str = "iid"
    exploration_rho: float = 0.0
    n_step: int = 1
    stride: int | None = None
    n_critics: int = 2
    target_critics: int = 2
    critic_layer_norm: bool = False
    normalize_state: bool = True
    target_noise_space: str = "residual"
    beta_reduction: str = "mean"
    policy_delay: int = 2
    ref_dropout: float = 0.0  # the RLT arm's; the regression arm always drops 50%
    demo_fraction: float = 0.0  # > 0: the prior's demos in a second replay, this share of each batch (RLPD)
    output: str = "benchmarks/results"
    tag: str = ""

    def benchmark(self) -> BenchmarkConfig:
        """The shared benchmark's config for its env and evaluation seeds."""
        return BenchmarkConfig(
            task=self.task,
            env_steps=self.env_steps,
            warmup_episodes=self.warmup_episodes,
            eval_every=self.eval_every,
            eval_episodes=self.eval_episodes,
            episode_steps=self.episode_steps,
            chunk_size=self.chunk_size,
        )


class StateBCPrior:
    """A ``Policy``: an MLP from the 39-D ``privileged`` state to a ``C×4`` chunk in ``[−1, 1]``."""

    action_dim = 4

    def __init__(self, network: torch.nn.Module, chunk_size: int, version: str) -> None:
        self.network, self.action_horizon, self.version = network.eval(), chunk_size, version

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        started = time.perf_counter()
        with torch.no_grad():
            states = torch.as_tensor(np.asarray(batch["privileged"], np.float32))
            chunks = self.network(states).clamp(-1, 1).reshape(len(states), self.action_horizon, 4)
        return ActionChunk(actions=chunks.numpy(), timing={"infer_ms": (time.perf_counter() - started) * 1e3})

    def reset(self) -> None:
        """Stateless."""


def train_bc_prior(config: ControlConfig, seed: int, demos: list[Demo]) -> StateBCPrior:
    """MSE behaviour cloning of ``C``-step chunks on ``demos`` (the episode's last action repeated past its end)."""
    inputs, targets = [], []
    for demo in demos:
        states, actions = demo.states, demo.actions
        padded = np.concatenate([actions, np.repeat(actions[-1:], config.chunk_size, axis=0)])
        for t in range(len(states)):
            inputs.append(states[t])
            targets.append(padded[t : t + config.chunk_size].ravel())
    x = torch.as_tensor(np.stack(inputs), dtype=torch.float32)
    y = torch.as_tensor(np.stack(targets), dtype=torch.float32)
    torch.manual_seed(seed)
    network = torch.nn.Sequential(
        torch.nn.Linear(STATE_DIM, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, config.chunk_size * 4),
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.bc_steps):
        index = torch.randint(len(x), (256,), generator=generator)
        loss = torch.nn.functional.mse_loss(network(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return StateBCPrior(network, config.chunk_size, f"state-bc-{config.demos}demos-seed{seed}")


class ExpertResidual:
    """The known-answer arm's policy: the prior's chunk moved toward the clean scripted expert's zero-order-hold
    chunk by at most the residual scale per entry, ``clip(ã + clip(e − ã, ±s), ±1)`` — what a residual actor of
    scale ``s`` could reach if it had learned the expert's correction exactly (an upper bound of its policy
    class, up to the chunk being open-loop)."""

    action_dim = 4

    def __init__(self, prior: StateBCPrior, task: str, scale: float) -> None:
        self.prior, self.scale = prior, scale
        self.action_horizon, self.version = prior.action_horizon, f"{prior.version}+expert-residual{scale:g}"
        self.expert = ScriptedExpert(task, 0.0, seed=0)

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        reference = self.prior.infer(batch).actions
        expert = np.stack([self.expert.act(state) for state in np.asarray(batch["privileged"])])[:, None]
        correction = np.clip(expert - reference, -self.scale, self.scale)
        return ActionChunk(actions=np.clip(reference + correction, -1.0, 1.0).astype(np.float32))

    def reset(self) -> None:
        """Stateless."""


def frozen_success(config: ControlConfig, policy: StateBCPrior | ExpertResidual) -> float:
    """A frozen policy's success rate on the evaluation seeds (``rlt_sample_efficiency.prior_episode`` each)."""
    benchmark = config.benchmark()
    env = make_env(benchmark)
    return float(np.mean([prior_episode(benchmark, env, policy, seed) for seed in eval_seeds(benchmark)]))


def learner_config(config: ControlConfig, arm: str, seed: int) -> LearnerConfig:
    """RLT's residual learner, or the critic-free regression ablation."""
    shared = {
        "chunk_size": config.chunk_size,
        "utd_ratio": config.utd_ratio,
        "n_step": config.n_step,
        "stride": config.stride,
        "n_critics": config.n_critics,
        "target_critics": config.target_critics,
        "critic_layer_norm": config.critic_layer_norm,
        "normalize_state": config.normalize_state,
        "policy_delay": config.policy_delay,
        "demo_fraction": config.demo_fraction,
        "seed": seed,
    }
    if arm == "regression":
        return LearnerConfig(**shared, q_weight=0.0, beta=config.beta, beta_reduction=config.beta_reduction)
    return LearnerConfig(
        **shared,
        residual_scale=config.residual_scale,
        beta=config.beta,
        beta_on="residual",
        beta_reduction=config.beta_reduction,
        target_noise_space=config.target_noise_space,
        ref_dropout=config.ref_dropout,
        critic_warmup_updates=config.critic_warmup_updates,
    )


def run_learner(
    config: ControlConfig,
    arm: str,
    seed: int,
    prior: StateBCPrior,
    demos: list[EpisodeRecord],
    on_point: PointHook,
) -> tuple[Curve, list[dict]]:
    """One online run from ``prior`` (warm-up included in the env steps; ``demos`` join it, in the second
    replay with ``demo_fraction`` > 0); the curve of its evaluations and the training episodes' success per
    ``TRAINING_WINDOW`` env steps (``training_windows``).

    ``on_point`` receives both so far after every evaluation (partial results survive a stopped run)."""
    torch.manual_seed(seed)
    env = make_env(config.benchmark())
    learner = OnlineRLT(
        EmbeddingPrior(prior, StateProjectionEmbedder(STATE_DIM, 1, 1, key="privileged", seed=seed)),
        AlwaysCritical(),
        None,
        config.benchmark().online(
            arm,
            seed,
            exploration_noise=config.exploration_noise,
            exploration=config.exploration,
            exploration_rho=config.exploration_rho,
            state_key="privileged",
        ),
        learner_config(config, arm, seed),
        proprio_dim=STATE_DIM,
    )
    loop = RLTLoop(learner, lambda: env)
    curve = run_reporting(loop, arm, seed, demos, on_point)
    return curve, training_windows(learner_episodes(loop.stats))


def run_arm(config: ControlConfig, arm: str, seed: int) -> Curve:
    """One arm and seed, from its JSON if it already landed (``load_result``); otherwise run it and write the
    JSON (``write_result``, rewritten at every evaluation point until the run is complete)."""
    name = f"{arm}_{config.tag}" if config.tag else arm
    path = Path(config.output) / f"rlt_positive_control_{config.task}_{name}_seed{seed}.json"
    settings = _arm_settings(config, arm)
    saved = load_result(path, settings, asdict(ControlConfig()))
    if saved is not None:
        return saved

    def write(curve: Curve, complete: bool, training: list[dict] | None = None) -> None:
        write_result(path, settings, curve, complete, {"training": training} if training else None)

    started = time.time()
    demos = collect_demos(config.benchmark(), seed, config.demos, config.demo_noise)
    prior = train_bc_prior(config, seed, demos)
    if arm in FROZEN_ARMS:
        policy = prior if arm == "prior" else ExpertResidual(prior, config.task, config.residual_scale)
        rate = frozen_success(config, policy)
        curve = Curve(arm, seed, [0, config.env_steps], [rate, rate], wall_s=time.time() - started)
        training = None
    else:
        records = (
            demo_records(config.task, config.chunk_size, demos, prior, config.demo_noise)
            if config.demo_fraction > 0
            else []
        )
        curve, training = run_learner(
            config,
            arm,
            seed,
            prior,
            records,
            on_point=lambda partial, windows: write(partial, False, windows),
        )
    write(curve, True, training)
    return curve


def _arm_settings(config: ControlConfig, arm: str) -> dict:
    settings = {k: v for k, v in asdict(config).items() if k not in ("seeds", "arms", "output", "tag")}
    return settings | {"arm": arm}


def main(config: ControlConfig) -> dict:
    """Run every arm for every seed (one after another), print per-seed curves and the summary."""
    torch.set_num_threads(1)
    curves = []
    for seed in config.seeds:
        for arm in config.arms:
            curves.append(run_arm(config, arm, seed))
            print_curve(curves[-1], width=10)
    summary = summarize(curves)
    print_summary(summary, width=10)
    suffix = f"_{config.tag}" if config.tag else ""
    plot(summary, config.benchmark(), Path(config.output) / f"rlt_positive_control_{config.task}{suffix}.png")
    return summary


def parse_args() -> ControlConfig:
    """Command-line flags → ``ControlConfig`` (every field is a flag)."""
    defaults = ControlConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            kind = int if name == "seeds" else str
            parser.add_argument(flag, nargs="+", type=kind, default=list(value))
        elif isinstance(value, bool):
            parser.add_argument(flag, type=lambda text: text.lower() in ("1", "true", "yes"), default=value)
        elif value is None:
            parser.add_argument(flag, type=int, default=None)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = vars(parser.parse_args())
    return replace(defaults, **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


if __name__ == "__main__":
    main(parse_args())
