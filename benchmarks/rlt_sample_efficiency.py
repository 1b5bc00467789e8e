"""RLT vs SB3 SAC from scratch vs the frozen prior on a Meta-World precision task, in one run.

All arms see the same task with a sparse +1 success reward (success terminates) and the same episode length.
The prior is state-based: Meta-World's scripted expert emitting zero-order-hold chunks of ``C`` actions with
Gaussian noise (``envs.scripted.ScriptedPolicy``), with fixed random-projection "embeddings" of the
privileged state standing in for VLA embeddings (``rlt.state.EmbeddingPrior``). RLT = RL token + chunked
actor-critic regularized to the prior's chunk (``rlt.online.OnlineRLT`` fed by ``actors.rlt_loop.RLTLoop``); "regression" is RLT without the critic
in its actor loss (the ablation: what RLT gains over it is the critic's); SAC reads the 39-D privileged state.
Success is measured on the same fixed evaluation seeds for every arm; curves are plotted with 95% t-intervals
over seeds.

    python benchmarks/rlt_sample_efficiency.py --task peg-insert-side-v3 --seeds 0 1 2 --env-steps 20000

A harder-tolerance precision task (``--success-tolerance``, e.g. reach-v3 at 5 mm with a ``hand-goal`` hand-off)
changes the success test of every arm alike.

A prior with a systematic error: ``--prior-bias 0.015`` makes the scripted prior misjudge the position of the
object (or goal) by 1.5 cm in the task's ``PRIOR_BIASES`` direction (``envs.experts.ScriptedExpert``), so every
grasp / alignment target it derives is off the same way. ``--prior-table`` measures the prior and the clean
expert at several biases instead of running arms (``benchmarks/results/biased_priors.txt``):

    python benchmarks/rlt_sample_efficiency.py --prior-table --tasks pick-place-v3 peg-insert-side-v3 \
        --biases 0 0.01 0.015 --eval-episodes 20 --episode-steps 300

The RLT claim's runs (issue 19 item 4): a biased prior, the hand-off at the grasp approach, the learner recipe
that passed the positive control (``--recipe``: its ``online`` and ``learner`` blocks set the ``rlt``,
``regression`` and ``residual`` arms; ``--set learner.KEY=VALUE`` overrides one), one process per arm and seed
so seeds accumulate in ``<output>/rlt_runs/`` (a learner arm's file is rewritten at every evaluation point):

    python benchmarks/rlt_sample_efficiency.py --task pick-place-v3 --prior-bias 0.015 --precision-handoff \
        --recipe configs/rlt-recipe.yaml --arms prior rlt --seeds 0 --env-steps 150000 --eval-every 10000 \
        --eval-episodes 30

Arms: ``prior``; ``rlt`` (RL token over the prior's embeddings + proprio state); ``regression`` (q_weight 0, the
chunk predicted directly with 50% reference dropout: the critic-free ablation); ``residual`` (RLT's learner on
the raw 39-D state, no RL token); ``rlpd`` (SB3 SAC + demos 50/50, LayerNorm ensemble); ``sac`` (from scratch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import torch
from scipy import stats
from stable_baselines3 import SAC
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import ReplayBufferSamples, Schedule
from stable_baselines3.common.vec_env import VecNormalize
from stable_baselines3.sac.policies import Actor, SACPolicy

from actors.recorder import EpisodeRecorder
from actors.rlt_loop import RLTLoop
from core.types import Outcome, StepSource
from envs import EnvConfig, MetaWorldEnv
from envs.experts import ScriptedExpert, bias_vectors, prior_bias_direction
from envs.metaworld_env import HANDOFF_PAIRS, PRECISION_HANDOFFS, PRIVILEGED_DIM
from envs.scripted import ScriptedPolicy, scripted_version
from experiments.commands.rlt import rlt_config
from experiments.tracking import log_command_run
from experiments.validation import UserError
from policies.base import ActionChunk, Observation, ObservationBatch, Policy, stack_observations
from rlt.config import OnlineConfig, OnlineSettings
from rlt.diagnostics import critic_calibration
from rlt.online import ChunkContext, EpisodeStats, EvalPoint, OnlineRLT
from rlt.phase import PhaseSwitch, handoff_switch
from rlt.rl_token import RLToken, RLTokenConfig
from rlt.state import EmbeddingPrior, StateProjectionEmbedder
from rlt.td3 import ChunkCritic, LearnerConfig
from storage.records import EpisodeRecord

#: The online settings a benchmark run owns (a recipe's values for them are ignored).
BUDGET_SETTINGS = (
    "warmup_episodes",
    "total_env_steps",
    "eval_every_steps",
    "eval_episodes",
    "eval_seed_base",
)
#: Env steps per window of ``training_windows``.
TRAINING_WINDOW = 10_000
#: A callback on each step of a prior's episode: (step, observation, info).
StepHook = Callable[[int, dict, dict], None]
#: The first evaluation episode's seed: the online loop's own (``rlt.config.OnlineSettings.eval_seed_base``).
EVAL_SEED_BASE = OnlineSettings.model_fields["eval_seed_base"].default


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark run: task, budget, seeds and the prior's quality."""

    task: str = "peg-insert-side-v3"
    seeds: tuple[int, ...] = (0, 1, 2)
    env_steps: int = 20_000
    eval_every: int = 5_000
    eval_episodes: int = 20
    episode_steps: int = 200
    prior_noise: float = 0.3
    prior_goal_bias: float = 0.0
    prior_bias: float = 0.0
    prior_bias_at: str | None = None
    success_tolerance: float | None = None
    chunk_size: int = 10
    critical_distance: float | None = 0.05
    critical_pair: str = "hand-object"
    precision_handoff: bool = False
    warmup_episodes: int = 20
    residual_scale: float = 0.1
    utd_ratio: int = 5
    beta: float = 1.0
    actor_q: str = "q1"
    normalize_state: bool = True
    token_steps: int = 2000
    demos: int = 10
    demo_noise: float = 0.3
    rlpd_critics: int = 10
    rlpd_target_critics: int = 2
    rlpd_utd: int = 10
    rlpd_demo_fraction: float = 0.5
    #: The RLPD-style arm's SAC settings (``RLPD_RECIPES``): ``sb3`` (SB3's SAC defaults) or ``serl``.
    rlpd_recipe: str = "sb3"
    output: str = "benchmarks/results"
    arms: tuple[str, ...] = ("prior", "rlt", "residual", "sac")
    mlflow_uri: str | None = None
    #: The learner arms' RLT settings (``rlt.config.RLTConfig``'s ``online`` and ``learner`` blocks, only the keys
    #: set), read from ``--recipe`` (e.g. ``configs/rlt-recipe.yaml``) and ``--set``: they win over the flags
    #: above; the benchmark keeps its own budget, evaluation and chunk size.
    recipe: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Suffix of the summary's JSON / PNG names (``rlt_sample_efficiency_<task>_<tag>``).
    tag: str = ""

    def online(self, arm: str, seed: int, **settings: Any) -> OnlineConfig:
        """An online loop's config for ``arm`` and ``seed``: this benchmark's task, budget, warm-up and evaluation
        (no images), with the arm's own ``settings`` (exploration, token steps, state key, …)."""
        recipe = {k: v for k, v in self.recipe.get("online", {}).items() if k not in BUDGET_SETTINGS}
        return OnlineConfig(
            task=self.task,
            warmup_episodes=self.warmup_episodes,
            total_env_steps=self.env_steps,
            eval_every_steps=self.eval_every,
            eval_episodes=self.eval_episodes,
            rl_version=arm,
            seed=seed,
            **settings | recipe,
        )


@dataclass
class Curve:
    """Evaluation success rate of one arm and seed at increasing env steps."""

    arm: str
    seed: int
    steps: list[int] = field(default_factory=list)
    success: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    probe: dict[str, float] = field(default_factory=dict)


def make_env(config: BenchmarkConfig) -> MetaWorldEnv:
    """The task without rendering, sparse reward, terminating on success."""
    return MetaWorldEnv(
        EnvConfig(
            task=config.task,
            render=False,
            reward="sparse",
            terminate_on_success=True,
            max_episode_steps=config.episode_steps,
            success_tolerance=config.success_tolerance,
        )
    )


@dataclass(frozen=True)
class Demo:
    """One successful episode of the noisy scripted expert: its observations, executed actions (``T×4``) and
    the observation its last action led to."""

    observations: list[Observation]
    actions: np.ndarray
    final: Observation

    @property
    def states(self) -> np.ndarray:
        """The ``T×39`` privileged states the prior reads."""
        return np.stack([observation["privileged"] for observation in self.observations])


def collect_demos(config: BenchmarkConfig, seed: int, count: int, noise: float) -> list[Demo]:
    """``count`` successful episodes of the unbiased scripted expert with action noise ``noise``, one action
    per step, on seeds ``10_000 · (seed + 1) + i`` (disjoint from the evaluation seeds)."""
    env = make_env(config)
    expert = ScriptedExpert(config.task, noise, seed=seed)
    demos, episode = [], 0
    while len(demos) < count:
        observation, _ = env.reset(seed=10_000 * (seed + 1) + episode)
        episode += 1
        observations, actions, terminated, truncated = [], [], False, False
        while not (terminated or truncated):
            observations.append(observation)
            actions.append(expert.act(observation["privileged"]))
            observation, _, terminated, truncated, _ = env.step(actions[-1])
        if terminated:
            demos.append(Demo(observations, np.stack(actions), observation))
    return demos


def prior_bias_spec(config: BenchmarkConfig) -> str:
    """The direction of ``config.prior_bias``: ``prior_bias_at`` or the task's ``PRIOR_BIASES`` entry."""
    return config.prior_bias_at or prior_bias_direction(config.task)


def make_prior(config: BenchmarkConfig, seed: int) -> EmbeddingPrior:
    """Noisy zero-order-hold scripted chunks with projected privileged-state embeddings of the true state.

    The scripted expert misjudges a position by ``prior_bias`` (see ``prior_bias_spec``) and, independently,
    the goal by ``prior_goal_bias`` along x: a prior that is consistently off, like a VLA with a miscalibrated
    camera."""
    biases = bias_vectors(prior_bias_spec(config), config.prior_bias) if config.prior_bias else {}
    if config.prior_goal_bias:
        goal = biases.get("goal_bias", (0.0, 0.0, 0.0))
        biases["goal_bias"] = (goal[0] + config.prior_goal_bias, goal[1], goal[2])
    prior = ScriptedPolicy(
        config.task, noise_std=config.prior_noise, seed=seed, action_horizon=config.chunk_size, **biases
    )
    return EmbeddingPrior(prior, StateProjectionEmbedder(PRIVILEGED_DIM, 8, 32, key="privileged", seed=seed))


def eval_seeds(config: BenchmarkConfig) -> list[int]:
    """Evaluation episodes use the same seeds for every arm."""
    return [EVAL_SEED_BASE + index for index in range(config.eval_episodes)]


def make_switch(config: BenchmarkConfig) -> PhaseSwitch:
    """The hand-off of the learner arms: the task's ``PRECISION_HANDOFFS`` entry with ``precision_handoff``,
    else ``critical_pair`` under ``critical_distance`` (None: RLT acts from the first chunk)."""
    if config.precision_handoff:
        return handoff_switch(HANDOFF_PAIRS, *PRECISION_HANDOFFS[config.task])
    return handoff_switch(HANDOFF_PAIRS, config.critical_pair, config.critical_distance or 0.0)


def prior_episode(
    config: BenchmarkConfig,
    env: MetaWorldEnv,
    prior: Policy,
    episode_seed: int,
    on_step: StepHook | None = None,
) -> bool:
    """One episode of ``prior`` in chunks of ``chunk_size``; whether it succeeded. ``on_step(t, observation,
    info)`` sees every observation before its action (``t % chunk_size == 0`` at chunk starts)."""
    observation, info = env.reset(seed=episode_seed)
    terminated, step = False, 0
    while True:
        for action in prior.infer(stack_observations([observation])).actions[0, : config.chunk_size]:
            if on_step is not None:
                on_step(step, observation, info)
            observation, _, terminated, truncated, info = env.step(action)
            step += 1
            if terminated or truncated:
                return bool(terminated)


def run_prior(config: BenchmarkConfig, seed: int) -> Curve:
    """The frozen prior's success on the evaluation seeds (flat over env steps)."""
    env, prior = make_env(config), make_prior(config, seed)
    outcomes = [prior_episode(config, env, prior, episode_seed) for episode_seed in eval_seeds(config)]
    rate = float(np.mean(outcomes))
    return Curve("prior", seed, [0, config.env_steps], [rate, rate])


class UnbiasedAfterHandoff:
    """The known-answer arm's policy: the benchmark's prior until the learner arms' hand-off (``make_switch``,
    latched), then the clean expert (no bias, no noise) in the same zero-order-hold chunks — what a learner that
    acts only after the hand-off could reach by correcting the prior's chunks fully."""

    def __init__(self, config: BenchmarkConfig, seed: int) -> None:
        self.biased = make_prior(config, seed)
        self.unbiased = make_prior(
            replace(config, prior_bias=0.0, prior_goal_bias=0.0, prior_noise=0.0), seed
        )
        self.switch, self.critical = make_switch(config), False
        self.action_horizon, self.version = config.chunk_size, f"{self.biased.version}+unbiased-after-handoff"

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        observation = {key: value[0] for key, value in batch.items() if key != "images"}
        self.critical = self.critical or self.switch.is_critical(observation, {})
        return (self.unbiased if self.critical else self.biased).infer(batch)

    def reset(self) -> None:
        """A new episode: the hand-off has not happened."""
        self.switch.reset()
        self.critical = False


def run_oracle(config: BenchmarkConfig, seed: int) -> Curve:
    """The known answer (``UnbiasedAfterHandoff``) on the evaluation seeds (flat over env steps)."""
    env, policy = make_env(config), UnbiasedAfterHandoff(config, seed)
    outcomes = []
    for episode_seed in eval_seeds(config):
        policy.reset()
        outcomes.append(prior_episode(config, env, policy, episode_seed))
    rate = float(np.mean(outcomes))
    return Curve("oracle", seed, [0, config.env_steps], [rate, rate])


#: The scripted expert's phase that starts each task's grasp approach (``envs.experts.ScriptedExpert.phase``,
#: the branch of its ``_desired_pos``): the descent onto the object once the hand is above it.
GRASP_APPROACH_PHASES = {"pick-place-v3": "phase1", "peg-insert-side-v3": "phase1", "assembly-v3": "phase2"}


def handoff_check(config: BenchmarkConfig, episodes: int = 10) -> dict[str, float]:
    """How the precision hand-off (``PRECISION_HANDOFFS``) fires in ``episodes`` rollouts of the (biased) prior
    (seed 0) on the evaluation seeds: the episodes in which it fired, the median of (the first chunk start at
    which it fired − the step at which the prior's expert, as biased, first enters its grasp-approach phase),
    and the prior's success rate in these rollouts."""
    env, prior = make_env(config), make_prior(config, 0)
    expert = ScriptedExpert(config.task, **prior.policy.biases)
    switch = handoff_switch(HANDOFF_PAIRS, *PRECISION_HANDOFFS[config.task])
    fired, lags, successes = 0, [], []
    for episode_seed in eval_seeds(config)[:episodes]:
        marks = _handoff_marks(config, env, prior, expert, switch, episode_seed)
        successes.append(marks.pop("success"))
        fired += "switch" in marks
        if {"switch", "phase"} <= marks.keys():
            lags.append(marks["switch"] - marks["phase"])
    lag = float(np.median(lags)) if lags else float("nan")
    return {"fired": fired, "episodes": episodes, "median_lag": lag, "success": float(np.mean(successes))}


def _handoff_marks(
    config: BenchmarkConfig,
    env: MetaWorldEnv,
    prior: Policy,
    expert: ScriptedExpert,
    switch: PhaseSwitch,
    episode_seed: int,
) -> dict[str, int]:
    """One prior episode: the step its expert enters the grasp approach (``phase``) and the first chunk start
    at which ``switch`` fires (``switch``), each absent if it never happens, and ``success`` (0 or 1)."""
    marks: dict[str, int] = {}
    approach = GRASP_APPROACH_PHASES[config.task]

    def mark(step: int, observation: dict, info: dict) -> None:
        if "phase" not in marks and expert.phase(observation["privileged"]) == approach:
            marks["phase"] = step
        if "switch" not in marks and step % config.chunk_size == 0 and switch.is_critical(observation, info):
            marks["switch"] = step

    switch.reset()
    marks["success"] = int(prior_episode(config, env, prior, episode_seed, mark))
    return marks


def prior_table(config: BenchmarkConfig, tasks: list[str], biases: list[float]) -> str:
    """Success of the clean scripted expert (no noise, one action per query) and of the benchmark's prior
    (``prior_noise``, chunks of ``chunk_size``) with each ``prior_bias`` in ``biases`` (metres), on the
    evaluation seeds of ``config`` (prior seed 0), as a text table. A task may name its bias's direction
    (``peg-insert-side-v3@goal:+y``); otherwise ``prior_bias_spec`` decides."""
    lines = [
        f"# scripted priors with a systematic position error: {config.eval_episodes} episodes each "
        f"(seeds {EVAL_SEED_BASE}+), {config.episode_steps} steps, state only",
        f"# prior = noise {config.prior_noise:g}, zero-order-hold chunks of {config.chunk_size}; "
        "clean = noise 0, one action per query",
        "# hand-off = PRECISION_HANDOFFS fired in k of the prior's rollouts; lag = median steps from the prior's "
        "expert entering its grasp approach (GRASP_APPROACH_PHASES) to the chunk start where it fired",
        f"{'task':<22} {'bias at':<10} {'bias cm':>7} {'clean':>6} {'prior':>6} {'hand-off':>9} {'lag':>5}",
    ]
    for entry in tasks:
        task, _, spec = entry.partition("@")
        for bias in biases:
            biased = replace(config, task=task, prior_bias=bias, prior_bias_at=spec or config.prior_bias_at)
            clean = run_prior(replace(biased, prior_noise=0.0, chunk_size=1), 0).success[0]
            check = handoff_check(biased, config.eval_episodes) if task in PRECISION_HANDOFFS else {}
            prior = check["success"] if check else run_prior(biased, 0).success[0]
            handoff = f"{check['fired']}/{check['episodes']} {check['median_lag']:>5.0f}" if check else ""
            lines.append(
                f"{task:<22} {prior_bias_spec(biased):<10} {100 * bias:>7.1f} {clean:>6.2f} {prior:>6.2f} "
                f"{handoff:>15}"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


#: Called with a learner arm's curve so far and its ``training_windows`` after every evaluation point.
PointHook = Callable[[Curve, list[dict]], object]


def run_rlt(config: BenchmarkConfig, seed: int, on_point: PointHook | None = None) -> Curve:
    """RLT from the prior: warm-up, RL token, then online chunked actor-critic."""
    return _online(config, seed, "rlt", rlt_learner(config, seed), on_point=on_point)


def run_regression(config: BenchmarkConfig, seed: int, on_point: PointHook | None = None) -> Curve:
    """RLT without the ``−Q`` term in the actor loss (``q_weight = 0``): the actor predicts the chunk itself
    (no residual) and only regresses toward ``ã`` with 50% reference dropout, on the same kind of data. What RLT
    gains over this arm is its critic's doing."""
    learner = _learner(
        config,
        seed,
        {"beta": config.beta},
        q_weight=0.0,
        residual_scale=None,
        beta_on="chunk",
        ref_dropout=LearnerConfig.model_fields["ref_dropout"].default,
    )
    return _online(config, seed, "regression", learner, on_point=on_point)


def rlt_learner(config: BenchmarkConfig, seed: int, q_weight: float = 1.0) -> LearnerConfig:
    """RLT's learner settings for this run: the benchmark's flags, the recipe's ``learner`` block over them."""
    return _learner(config, seed, {"beta": config.beta, "actor_q": config.actor_q}, q_weight=q_weight)


def _learner(
    config: BenchmarkConfig, seed: int, defaults: dict[str, Any] | None = None, **arm: Any
) -> LearnerConfig:
    """The learner settings every arm shares (chunk, update ratio, state normalization) and the arm's
    ``defaults``, then the recipe's ``learner`` block, then what defines the arm (``arm``) and the seed."""
    shared = {"utd_ratio": config.utd_ratio, "normalize_state": config.normalize_state}
    recipe = config.recipe.get("learner", {})
    return LearnerConfig(
        **shared | (defaults or {}) | recipe | arm | {"chunk_size": config.chunk_size, "seed": seed}
    )


def run_residual(config: BenchmarkConfig, seed: int, on_point: PointHook | None = None) -> Curve:
    """Residual TD3 on the raw 39-D privileged state: RLT's learner (``rlt_learner``) in residual mode
    (``ã + s · π``, zero-initialised; the learner's scale, else ``--residual-scale``) with no RL token — the one
    difference from the RLT arm is the state the learner reads (the probe of issue 19, inside the project)."""
    learner = rlt_learner(config, seed)
    if learner.residual_scale is None:
        learner = learner.model_copy(update={"residual_scale": config.residual_scale})
    return _online(config, seed, "residual", learner, raw_state=True, on_point=on_point)


def _online(
    config: BenchmarkConfig,
    seed: int,
    arm: str,
    learner: LearnerConfig,
    raw_state: bool = False,
    on_point: PointHook | None = None,
) -> Curve:
    """Run a learner arm (with the demos in its second replay when the learner samples one), reporting each
    evaluation point to ``on_point`` as it lands."""
    loop = make_loop(config, seed, arm, learner, raw_state=raw_state)
    records = demo_episodes(config, seed, loop.rlt.prior) if learner.demo_fraction > 0 else []
    curve = run_reporting(loop, arm, seed, records, on_point)
    curve.probe = probe_actor_and_critic(loop, config)
    return curve


def run_reporting(
    loop: RLTLoop, arm: str, seed: int, records: list[EpisodeRecord], on_point: PointHook | None = None
) -> Curve:
    """``loop.run(records)``, printing every evaluation point as it lands and handing the curve so far and the
    ``training_windows`` to ``on_point`` — after each point and once more at the end, with every episode."""
    started, reported = time.time(), [0]

    def report(_: EpisodeStats | None = None) -> None:
        if len(loop.curve) > reported[0]:
            reported[0] = len(loop.curve)
            curve = curve_of(arm, seed, loop.curve, time.time() - started)
            print_point(curve)
            if on_point is not None:
                on_point(curve, training_windows(learner_episodes(loop.stats)))

    loop.on_stats = report
    loop.run(records)
    report()
    return curve_of(arm, seed, loop.curve, time.time() - started)


def print_point(curve: Curve) -> None:
    """A progress line for the evaluation point that just landed on ``curve``."""
    print(
        f"  {curve.arm} seed {curve.seed}: {curve.steps[-1]} env steps → {curve.success[-1]:.2f} "
        f"({curve.wall_s:.0f} s)",
        flush=True,
    )


def curve_of(arm: str, seed: int, points: list[EvalPoint], wall_s: float) -> Curve:
    """A learner arm's ``Curve`` from its loop's evaluation points."""
    steps, success = [point.env_steps for point in points], [point.success_rate for point in points]
    return Curve(arm, seed, steps, success, wall_s=wall_s)


def training_windows(episodes: Iterable[tuple[int, bool]]) -> list[dict]:
    """Success of a learner's exploring episodes, given as (env steps at the episode's end, success), per
    ``TRAINING_WINDOW`` env steps: many more episodes than an evaluation point, so a less noisy learning signal."""
    windows: dict[int, list[bool]] = {}
    for env_steps, success in episodes:
        windows.setdefault(env_steps // TRAINING_WINDOW, []).append(success)
    return [
        {"until": (index + 1) * TRAINING_WINDOW, "episodes": len(flags), "success": float(np.mean(flags))}
        for index, flags in sorted(windows.items())
    ]


def learner_episodes(stats: list[EpisodeStats]) -> list[tuple[int, bool]]:
    """The online loop's exploring (``learner``-mode) episodes as ``training_windows`` takes them."""
    return [(episode.env_steps, episode.success) for episode in stats if episode.mode == "learner"]


def make_loop(
    config: BenchmarkConfig,
    seed: int,
    arm: str,
    learner: LearnerConfig,
    exploration_noise: float | None = None,
    raw_state: bool = False,
) -> RLTLoop:
    """The online loop of a learner arm (seeded torch), not yet run: the RL token over the prior's embeddings
    plus the proprio state, or (``raw_state``) no token and the 39-D privileged state. Exploration: the
    recipe's, else ``exploration_noise``, else 0.2 (RLT) or half the residual scale (residual mode)."""
    torch.manual_seed(seed)
    switch = make_switch(config)
    env = make_env(config)
    if exploration_noise is None:
        exploration_noise = learner.residual_scale / 2 if raw_state and learner.residual_scale else 0.2
    settings: dict[str, Any] = {"token_steps": config.token_steps, "exploration_noise": exploration_noise}
    if raw_state:
        settings["state_key"] = "privileged"
    online = config.online(arm, seed, **settings)
    rlt = OnlineRLT(
        make_prior(config, seed),
        switch,
        None if raw_state else RLToken(RLTokenConfig(num_tokens=8, embed_dim=32, z_dim=32)),
        online,
        learner,
        proprio_dim=len(env.reset(seed=seed)[0][online.state_key]),
    )
    return RLTLoop(rlt, lambda: env)


def demo_episodes(config: BenchmarkConfig, seed: int, prior: Policy) -> list[EpisodeRecord]:
    """The ``demos`` successful episodes of the unbiased noisy expert (``collect_demos``) as records for a
    learner's second replay, each chunk's reference ``ã`` the prior's chunk there (``demo_records``)."""
    demos = collect_demos(config, seed, config.demos, config.demo_noise)
    return demo_records(config.task, config.chunk_size, demos, prior, config.demo_noise)


def demo_records(
    task: str, chunk_size: int, demos: list[Demo], prior: Policy, demo_noise: float
) -> list[EpisodeRecord]:
    """Demos (``collect_demos``: the scripted expert with action noise ``demo_noise``) as episode records for
    RLT's second replay: ``chunk_size``-step chunks of the expert's actions, each with the prior's chunk at its
    start as the reference ``ã`` (what the actor reads when it acts)."""
    version, records = scripted_version(demo_noise), []
    for index, demo in enumerate(demos):
        recorder = EpisodeRecorder(task, task, seed=index, record_images=False)
        padded = np.concatenate([demo.actions, np.repeat(demo.actions[-1:], chunk_size, axis=0)])
        for t, observation in enumerate(demo.observations):
            if t % chunk_size == 0:
                reference = prior.infer(stack_observations([observation])).actions[0, :chunk_size]
                chunk_id = recorder.add_chunk(padded[t : t + chunk_size], reference=reference)
            last = t == len(demo.actions) - 1
            recorder.add_step(
                observation,
                demo.actions[t],
                float(last),
                last,
                False,
                source=StepSource.POLICY,
                policy_version=version,
                chunk_id=chunk_id,
                chunk_offset=t % chunk_size,
                latency_ms=0.0,
            )
        records.append(recorder.finish(Outcome.SUCCESS))
    return records


@dataclass
class CriticalChunk:
    """A critical chunk start of an evaluation episode: the state's context, the chunk played there, the clean
    expert's chunk, the actions that led there (replaying them restores the state) and whether it is the first."""

    episode_seed: int
    prefix: list[np.ndarray]
    context: ChunkContext
    chunk: np.ndarray
    clean: np.ndarray
    first: bool


def critical_chunks(
    loop: OnlineRLT, config: BenchmarkConfig, episodes: int, learner_acts: bool
) -> Iterator[CriticalChunk]:
    """Play the first ``episodes`` evaluation episodes and yield every critical chunk start.

    After the hand-off the trained learner plays (``learner_acts``) or the prior does (its ``ã``); the clean
    chunk is the noise-free scripted expert's at the same state.
    """
    clean = ScriptedPolicy(config.task, noise_std=0.0, action_horizon=config.chunk_size)
    env = make_env(config)
    for episode_seed in eval_seeds(config)[:episodes]:
        observation, info = env.reset(seed=episode_seed)
        loop.phase_switch.reset()
        critical = done = False
        prefix: list[np.ndarray] = []
        while not done:
            context, _ = loop.chunk_context(observation)
            first = not critical and loop.phase_switch.is_critical(observation, info)
            critical = critical or first
            acting = critical and learner_acts
            chunk = loop.learner_chunk(context) if acting else context.reference
            if critical:
                target = clean.infer(stack_observations([observation])).actions[0, : config.chunk_size]
                yield CriticalChunk(episode_seed, list(prefix), context, chunk, target, first)
            for action in chunk:
                prefix.append(action)
                observation, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
                if done:
                    break


def probe_actor_and_critic(loop: RLTLoop, config: BenchmarkConfig, episodes: int = 10) -> dict[str, float]:
    """What the trained learner does at the critical chunk starts of its first evaluation episodes.

    Also how its critic's values of the chunks it executed compare with the discounted returns that followed
    (``rlt.diagnostics.critic_calibration`` on the loop's last evaluation: mean Q − return, rank correlation).

    The clean (noise-free) scripted expert's chunk ``c`` is the yardstick: how far the summed displacement
    (xyz, in action units: 1 = 1 cm) of the prior's reference ``ã`` and of the actor's chunk ``a`` land from
    ``c``'s, and whether the critic ranks ``c`` above ``ã`` and by how much it believes ``a`` beats ``ã``.
    """
    rows = [
        _probe_row(loop.rlt, start.context, start.chunk, start.clean)
        for start in critical_chunks(loop.rlt, config, episodes, learner_acts=True)
    ]
    table = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} if rows else {}
    calibration = critic_calibration(loop.rlt.learner, loop.rlt.encoder, loop.last_evaluation[:episodes])
    return {
        **table,
        "chunks": len(rows),
        "critic_q_minus_mc_return": calibration.bias,
        "critic_mc_return_spearman": calibration.spearman,
    }


def _probe_row(
    loop: OnlineRLT, context: ChunkContext, chunk: np.ndarray, clean: np.ndarray
) -> dict[str, float]:
    def displacement_error(candidate: np.ndarray) -> float:
        return float(np.linalg.norm((candidate - clean)[:, :3].sum(axis=0)))

    state = loop.encoder.encode(context.embeddings[None], context.proprio[None])
    references = context.reference[None].repeat(3, axis=0)
    q_ref, q_clean, q_actor = loop.learner.q_values(
        state.repeat(3, axis=0), references, np.stack([context.reference, clean, chunk])
    )
    return {
        "reference_displacement_error": displacement_error(context.reference),
        "actor_displacement_error": displacement_error(chunk),
        "critic_prefers_clean": float(q_clean > q_ref),
        "q_clean_minus_reference": float(q_clean - q_ref),
        "q_actor_minus_reference": float(q_actor - q_ref),
    }


class _StateEnv(gym.Env):
    """The task as a flat-vector env for SB3: privileged 39-D state in, 4-D action out."""

    def __init__(self, config: BenchmarkConfig) -> None:
        self.env = make_env(config)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (PRIVILEGED_DIM,), np.float32)
        self.action_space = self.env.action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        observation, info = self.env.reset(seed=seed)
        return observation["privileged"], info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation["privileged"], reward, terminated, truncated, info


class _EvalCallback(BaseCallback):
    """Deterministic success rate on the evaluation seeds every ``every`` env steps, each point printed and handed
    to ``on_point`` with the exploring episodes' ``training_windows`` (success = terminated, not truncated)."""

    def __init__(self, config: BenchmarkConfig, curve: Curve, on_point: PointHook | None = None) -> None:
        super().__init__()
        self.config, self.curve, self.env = config, curve, _StateEnv(config)
        self.on_point, self.episodes, self.started = on_point, [], time.time()

    def _on_training_start(self) -> None:
        self._evaluate()

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"], strict=True):
            if done:
                self.episodes.append((self.num_timesteps, not info.get("TimeLimit.truncated", False)))
        if self.num_timesteps % self.config.eval_every == 0:
            self._evaluate()
        return True

    def _evaluate(self) -> None:
        successes = []
        for episode_seed in eval_seeds(self.config):
            observation, _ = self.env.reset(seed=episode_seed)
            done = terminated = False
            while not done:
                action, _ = self.model.predict(observation, deterministic=True)
                observation, _, terminated, truncated, _ = self.env.step(action)
                done = terminated or truncated
            successes.append(float(terminated))
        self.curve.steps.append(self.num_timesteps)
        self.curve.success.append(float(np.mean(successes)))
        self.curve.wall_s = time.time() - self.started
        print_point(self.curve)
        if self.on_point is not None:
            self.on_point(self.curve, training_windows(self.episodes))


def run_sac(config: BenchmarkConfig, seed: int, on_point: PointHook | None = None) -> Curve:
    """SB3 SAC from scratch (defaults) on the privileged state."""
    model = SAC("MlpPolicy", _StateEnv(config), buffer_size=config.env_steps, seed=seed, device="cpu")
    return _learn_sac(config, model, Curve("sac", seed), on_point)


def _learn_sac(config: BenchmarkConfig, model: SAC, curve: Curve, on_point: PointHook | None = None) -> Curve:
    """Train an SB3 SAC model for the budget, evaluating on the evaluation seeds into ``curve`` (each point to
    ``on_point``)."""
    model.learn(config.env_steps, callback=_EvalCallback(config, curve, on_point))
    return curve


class EnsembleCritic(ChunkCritic):
    """``rlt.td3.ChunkCritic`` with LayerNorm (``n_critics`` members); with ``sampled`` set, each call returns
    only that many members drawn at random (REDQ / RLPD: the target is the min over 2 sampled members). With
    ``actor_mean``, a call whose actions carry a gradient (SAC's actor loss: the actor's own actions) returns the
    members' mean alone, so the actor climbs the ensemble's mean (RLPD) instead of SAC's min over members."""

    def __init__(self, *args: Any, sampled: int | None = None, actor_mean: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, layer_norm=True, **kwargs)
        self.sampled, self.actor_mean = sampled, actor_mean

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.set_grad_enabled(not self.share_features_extractor):
            features = self.extract_features(obs, self.features_extractor)
        inputs = torch.cat([features, actions], dim=1)
        members = (
            range(self.n_critics) if self.sampled is None else torch.randperm(self.n_critics)[: self.sampled]
        )
        values = tuple(self.q_networks[int(index)](inputs) for index in members)
        if self.actor_mean and actions.requires_grad:
            return (torch.stack(values).mean(dim=0),)
        return values


class NoEntropyBackupActor(Actor):
    """SB3's SAC actor whose log-probabilities are zero when computed outside autograd: SAC computes its
    critic's target under ``no_grad``, so the target carries no entropy bonus (SERL's ``backup_entropy=False``;
    with a sparse 0/1 reward the bonus of SB3's soft target, summed over the horizon, is ~30× the reward). The
    actor's and the temperature's losses, computed with gradients, keep their entropy terms."""

    def action_log_prob(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actions, log_prob = super().action_log_prob(obs)
        return actions, log_prob if torch.is_grad_enabled() else torch.zeros_like(log_prob)


class RLPDPolicy(SACPolicy):
    """SB3's SAC policy with an ``EnsembleCritic`` of ``n_critics`` members whose target samples
    ``target_critics`` of them. The actor climbs the min over all members (SB3's SAC rule) or, with
    ``actor_mean``, their mean (RLPD, SERL); ``backup_entropy`` False drops the entropy bonus from the critic's
    target (``NoEntropyBackupActor``)."""

    def __init__(
        self,
        *args: Any,
        target_critics: int = 2,
        actor_mean: bool = False,
        backup_entropy: bool = True,
        **kwargs: Any,
    ) -> None:
        self.target_critics, self.actor_mean, self.backup_entropy = target_critics, actor_mean, backup_entropy
        super().__init__(*args, **kwargs)

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> Actor:
        if self.backup_entropy:
            return super().make_actor(features_extractor)
        kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        return NoEntropyBackupActor(**kwargs).to(self.device)

    def make_critic(self, features_extractor: BaseFeaturesExtractor | None = None) -> EnsembleCritic:
        kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return EnsembleCritic(**kwargs, actor_mean=self.actor_mean).to(self.device)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        self.critic_target.sampled = self.target_critics

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {
            **super()._get_constructor_parameters(),
            "target_critics": self.target_critics,
            "actor_mean": self.actor_mean,
            "backup_entropy": self.backup_entropy,
        }


class DemoReplayBuffer(ReplayBuffer):
    """SB3's replay with a second replay of demonstrations (``demos``) that supplies ``demo_fraction`` of every
    sampled batch, the rest coming from online data (RLPD's symmetric sampling at 0.5). ``sampled_rows`` and
    ``sampled_demo_rows`` count what ``sample`` returned."""

    def __init__(self, *args: Any, demo_fraction: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.demos = ReplayBuffer(*args, **kwargs)
        self.demo_fraction = demo_fraction
        self.sampled_rows = self.sampled_demo_rows = 0

    def add_demo(self, demo: Demo) -> None:
        """One successful episode as transitions: reward 1 and done on its last step, 0 before."""
        states = [*demo.states, demo.final["privileged"]]
        last = len(demo.actions) - 1
        for t, action in enumerate(demo.actions):
            done = np.array([float(t == last)])
            self.demos.add(states[t][None], states[t + 1][None], action[None], done.copy(), done, [{}])

    def sample(self, batch_size: int, env: VecNormalize | None = None) -> ReplayBufferSamples:
        demo_rows = round(batch_size * self.demo_fraction) if self.demos.size() else 0
        online = super().sample(batch_size - demo_rows, env)
        self.sampled_rows += batch_size
        self.sampled_demo_rows += demo_rows
        if not demo_rows:
            return online
        demos = self.demos.sample(demo_rows, env)
        return ReplayBufferSamples(
            *(None if a is None else torch.cat([a, b]) for a, b in zip(online, demos, strict=True))
        )


#: The RLPD-style arm's SAC settings by name: ``sb3``, SB3's SAC defaults (the soft target with its entropy
#: bonus, temperature from 1.0, γ 0.99, the actor on the ensemble's min); ``serl``, SERL / HIL-SERL's (no entropy
#: bonus in the target, temperature from 0.01, γ 0.97, the actor on the ensemble's mean as in RLPD).
RLPD_RECIPES: dict[str, dict[str, Any]] = {
    "sb3": {"policy": {}, "sac": {}},
    "serl": {
        "policy": {"actor_mean": True, "backup_entropy": False},
        "sac": {"ent_coef": "auto_0.01", "gamma": 0.97},
    },
}


def make_rlpd(config: BenchmarkConfig, seed: int) -> SAC:
    """The RLPD-style arm's model, its demo replay filled: SB3 SAC on the privileged state with ``demos``
    successful episodes of the unbiased noisy expert (``demo_noise``) in a second replay sampled
    ``rlpd_demo_fraction`` of each batch, a LayerNorm ensemble of ``rlpd_critics`` (target: min over
    ``rlpd_target_critics`` sampled), ``rlpd_utd`` gradient steps per env step and the SAC settings of
    ``RLPD_RECIPES[rlpd_recipe]``."""
    recipe = RLPD_RECIPES[config.rlpd_recipe]
    torch.manual_seed(seed)
    model = SAC(
        RLPDPolicy,
        _StateEnv(config),
        buffer_size=config.env_steps,
        gradient_steps=config.rlpd_utd,
        replay_buffer_class=DemoReplayBuffer,
        replay_buffer_kwargs={"demo_fraction": config.rlpd_demo_fraction},
        policy_kwargs={
            "n_critics": config.rlpd_critics,
            "target_critics": config.rlpd_target_critics,
            **recipe["policy"],
        },
        seed=seed,
        device="cpu",
        **recipe["sac"],
    )
    for demo in collect_demos(config, seed, config.demos, config.demo_noise):
        model.replay_buffer.add_demo(demo)
    return model


def run_rlpd(config: BenchmarkConfig, seed: int, on_point: PointHook | None = None) -> Curve:
    """The RLPD-style arm (``make_rlpd``), evaluated like SAC; ``probe`` records the demo share of the batches."""
    model = make_rlpd(config, seed)
    curve = _learn_sac(config, model, Curve("rlpd", seed), on_point)
    buffer = model.replay_buffer
    curve.probe = {"demo_share": buffer.sampled_demo_rows / max(buffer.sampled_rows, 1)}
    return curve


def t_half_width(values: np.ndarray) -> np.ndarray:
    """95% t-interval half-width of the mean over axis 0 (seeds); nan with fewer than two."""
    runs = len(values)
    if runs < 2:
        return np.full(values.shape[1:], np.nan)
    return stats.t.ppf(0.975, runs - 1) * values.std(axis=0, ddof=1) / np.sqrt(runs)


def summarize(curves: list[Curve]) -> dict[str, dict[str, Any]]:
    """Per arm and evaluation point, over the seeds whose runs reached that point (an unfinished seed counts up
    to its last point, so it neither cuts the finished seeds' curves short nor is left out): eval steps (mean:
    RLT's include its warm-up), mean success, 95% t-interval half-width and ``seeds_at`` (how many seeds);
    ``seeds``, the arm's number of runs."""
    summary = {}
    for arm in sorted({curve.arm for curve in curves}):
        runs = [curve for curve in curves if curve.arm == arm]
        points = [
            [curve for curve in runs if len(curve.success) > index]
            for index in range(max(len(curve.success) for curve in runs))
        ]
        columns = [np.array([curve.success[index] for curve in at]) for index, at in enumerate(points)]
        summary[arm] = {
            "steps": [round(float(np.mean([curve.steps[i] for curve in at]))) for i, at in enumerate(points)],
            "mean": [float(column.mean()) for column in columns],
            "ci95": [float(t_half_width(column[:, None])[0]) for column in columns],
            "seeds_at": [len(at) for at in points],
            "seeds": len(runs),
        }
    return summary


def steps_to_reach(summary: dict, arm: str, level: float) -> int | None:
    """First evaluated env step at which the arm's mean success reaches ``level`` (None if never)."""
    for step, mean in zip(summary[arm]["steps"], summary[arm]["mean"], strict=True):
        if mean >= level:
            return int(step)
    return None


#: How the plot names an arm (arms not listed by their own name).
ARM_LABELS = {
    "oracle": "known answer",
    "regression": "regression (no critic)",
    "residual": "residual TD3, raw state",
    "rlpd": "RLPD-style",
    "sac": "SAC from scratch",
}


def plot(summary: dict, config: BenchmarkConfig, path: Path) -> None:
    """Learning curves with 95% intervals, each arm labelled with its number of seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    for arm, data in summary.items():
        steps, mean, half = np.array(data["steps"]), np.array(data["mean"]), np.nan_to_num(data["ci95"])
        counts = sorted(set(data["seeds_at"]))
        seeds = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else counts[0]
        axis.plot(steps, mean, marker="o", label=f"{ARM_LABELS.get(arm, arm)} (n={seeds})")
        axis.fill_between(steps, mean - half, mean + half, alpha=0.2)
    axis.set(xlabel="env steps", ylabel="success rate", ylim=(-0.05, 1.05), title=config.task)
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


#: Settings that change the results of an arm (arms not listed depend on every setting).
TASK_SETTINGS = ("task", "env_steps", "eval_every", "eval_episodes", "episode_steps", "success_tolerance")
ARM_SETTINGS = {
    "sac": TASK_SETTINGS,
    "rlpd": (
        *TASK_SETTINGS,
        "demos",
        "demo_noise",
        "rlpd_critics",
        "rlpd_target_critics",
        "rlpd_utd",
        "rlpd_demo_fraction",
        "rlpd_recipe",
    ),
    "prior": (*TASK_SETTINGS, "prior_noise", "prior_goal_bias", "prior_bias", "prior_bias_at", "chunk_size"),
}
ARM_SETTINGS["oracle"] = (*ARM_SETTINGS["prior"], "precision_handoff", "critical_pair", "critical_distance")
#: The RLPD-style arm's own settings: they do not change the learner arms (which read every other setting).
RLPD_ONLY_SETTINGS = ("rlpd_critics", "rlpd_target_critics", "rlpd_utd", "rlpd_demo_fraction", "rlpd_recipe")
LEARNER_SETTINGS = tuple(
    name for name in BenchmarkConfig.__dataclass_fields__ if name not in RLPD_ONLY_SETTINGS
)
ARM_SETTINGS |= dict.fromkeys(("rlt", "regression", "residual"), LEARNER_SETTINGS)

ARMS = {
    "prior": run_prior,
    "oracle": run_oracle,
    "rlt": run_rlt,
    "regression": run_regression,
    "residual": run_residual,
    "sac": run_sac,
    "rlpd": run_rlpd,
}


#: The arms that learn: they report every evaluation point as it lands (a stopped run keeps its curve so far).
LEARNING_ARMS = ("rlt", "regression", "residual", "sac", "rlpd")

#: Settings that do not change any arm's results (left out of the cache key).
RUN_ONLY_SETTINGS = ("seeds", "arms", "output", "mlflow_uri", "tag")


def arm_settings(config: BenchmarkConfig, arm: str) -> dict[str, Any]:
    """The settings that change the results of ``arm`` (SAC ignores the prior and the learners' settings, the
    prior arm the learners')."""
    relevant = ARM_SETTINGS.get(arm)
    return {
        k: v
        for k, v in asdict(config).items()
        if k not in RUN_ONLY_SETTINGS and (relevant is None or k in relevant)
    }


def curve_path(config: BenchmarkConfig, arm: str, seed: int) -> Path:
    """Where ``run_cached`` keeps the curve of ``arm`` and ``seed`` under this configuration:
    ``<output>/rlt_runs/<task>/<key>/<arm>_seed<seed>.json``, ``key`` hashing the arm's settings that differ from
    their defaults (so a setting added later, at its default, keeps the key of the runs before it)."""
    defaults = asdict(BenchmarkConfig())
    changed = {k: v for k, v in arm_settings(config, arm).items() if v != defaults.get(k)}
    key = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
    return Path(config.output) / "rlt_runs" / config.task / key / f"{arm}_seed{seed}.json"


def same_settings(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether a result file run with ``saved`` settings was run with ``current``'s: a setting added after the
    file was written counts as equal when ``current`` holds its ``defaults`` value (the file ran as the default
    runs); a saved setting ``current`` no longer has makes them differ."""
    current, defaults = json.loads(json.dumps(current)), json.loads(json.dumps(defaults))  # tuples as lists
    return set(saved) <= set(current) and all(
        saved.get(key, defaults.get(key)) == value for key, value in current.items()
    )


def load_result(
    path: Path, settings: dict[str, Any], defaults: dict[str, Any], unread: Collection[str] = ()
) -> Curve | None:
    """The curve of result file ``path`` (``write_result``'s) if it is complete and ``same_settings`` as
    ``settings``, leaving out saved settings the arm no longer reads (``unread``); else None (no file, a partial
    run, other settings)."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    config = {key: value for key, value in saved["config"].items() if key not in unread}
    if saved.get("complete", True) and same_settings(config, settings, defaults):
        return Curve(**saved["curve"])
    return None


def write_result(
    path: Path,
    settings: dict[str, Any],
    curve: Curve,
    complete: bool = True,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write one arm and seed's result file: its ``settings`` (``config``), whether the run is ``complete`` (a
    partial one is rewritten as its points land) and its ``curve``, with any ``extra`` entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"config": settings, "complete": complete, "curve": asdict(curve)} | (extra or {})
    path.write_text(json.dumps(document, indent=1))


def run_cached(config: BenchmarkConfig, arm: str, seed: int) -> Curve:
    """Run one arm and seed, or load its curve if it already ran with these settings (``curve_path``,
    ``load_result``), so arms can run in parallel processes and a final call only summarizes. A learner arm's
    file is rewritten (incomplete, with its ``training`` windows) at every evaluation point, so a stopped run
    leaves its curve so far."""
    path, settings = curve_path(config, arm, seed), arm_settings(config, arm)
    unread = set(asdict(config)) - set(settings)
    curve = load_result(path, settings, asdict(BenchmarkConfig()), unread)
    if curve is not None:
        return curve
    started, extra = time.time(), {}

    def partial(curve: Curve, training: list[dict]) -> None:
        extra["training"] = training
        write_result(path, settings, curve, complete=False, extra=extra)

    curve = ARMS[arm](config, seed, partial) if arm in LEARNING_ARMS else ARMS[arm](config, seed)
    curve.wall_s = time.time() - started
    write_result(path, settings, curve, extra=extra)
    return curve


#: The claim's level and its margins over the prior and the critic-free arm (issue 19's done-when).
CLAIM_LEVEL, CLAIM_MARGIN = 0.85, 0.30
#: How many times more env steps SAC from scratch must need to reach the prior's level than RLT.
SAC_STEP_RATIO = 10
#: Evaluation points averaged into an arm's final success (two points of 30 episodes: half the variance).
FINAL_POINTS = 2


def final_success(curve: Curve) -> float:
    """A run's final success: the mean of its last ``FINAL_POINTS`` evaluation points (all, if fewer)."""
    return float(np.mean(curve.success[-FINAL_POINTS:]))


def mean_and_interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t-interval half-width over seeds (nan with one seed)."""
    return float(np.mean(values)), float(t_half_width(np.asarray(values)))


def final_gap(curves: list[Curve], arm: str, other: str) -> tuple[float, float, int]:
    """``arm``'s final success minus ``other``'s, paired by seed: mean, 95% half-width, seeds paired."""
    finals = {(curve.arm, curve.seed): final_success(curve) for curve in curves}
    seeds = sorted(seed for name, seed in finals if name == arm and (other, seed) in finals)
    if not seeds:
        return float("nan"), float("nan"), 0
    return *mean_and_interval([finals[arm, seed] - finals[other, seed] for seed in seeds]), len(seeds)


def targets(curves: list[Curve], summary: dict) -> dict[str, object]:
    """Issue 19's targets for RLT, on each run's ``final_success`` (mean over seeds, paired gaps with 95%
    intervals): ≥ ``CLAIM_LEVEL``; ≥ ``CLAIM_MARGIN`` above the prior and the regression arm; ``CLAIM_LEVEL``
    reached (by the mean curve) in fewer env steps than the RLPD-style arm; the prior's level reached in
    ≥ ``SAC_STEP_RATIO``× fewer env steps than SAC from scratch (or SAC never reaches it — said so)."""
    rlt = [final_success(curve) for curve in curves if curve.arm == "rlt"]
    mean, half = mean_and_interval(rlt)
    result: dict[str, object] = {"rlt_final": mean, "rlt_final_ci95": half, "rlt_seeds": len(rlt)}
    result[f"rlt_at_least_{CLAIM_LEVEL}"] = mean >= CLAIM_LEVEL
    for other in ("prior", "regression"):
        gap, gap_half, paired = final_gap(curves, "rlt", other)
        if paired:
            result[f"rlt_minus_{other}"] = {"mean": gap, "ci95": gap_half, "seeds": paired}
            result[f"rlt_{CLAIM_MARGIN:.2f}_above_{other}"] = gap >= CLAIM_MARGIN
    if "rlpd" in summary:
        result["vs_rlpd"] = steps_comparison(summary, "rlpd", CLAIM_LEVEL)
        result["fewer_steps_than_rlpd"] = result["vs_rlpd"]["rlt_first"]
    if "sac" in summary and "prior" in summary:
        level = float(np.mean([final_success(curve) for curve in curves if curve.arm == "prior"]))
        result["vs_sac"] = steps_comparison(summary, "sac", level)
        ratio = result["vs_sac"]["ratio"]
        result[f"at_least_{SAC_STEP_RATIO}x_fewer_steps_than_sac"] = (
            ratio is not None and ratio >= SAC_STEP_RATIO
        )
    return result


def steps_comparison(summary: dict, other: str, level: float) -> dict[str, object]:
    """The first evaluated env step at which RLT's and ``other``'s mean curves reach ``level``; whether RLT got
    there first; ``other``'s steps over RLT's (a lower bound, from ``other``'s last evaluated step, when
    ``other`` never got there)."""
    rlt_steps, other_steps = steps_to_reach(summary, "rlt", level), steps_to_reach(summary, other, level)
    bound = other_steps if other_steps is not None else summary[other]["steps"][-1]
    return {
        "level": level,
        "rlt_steps": rlt_steps,
        f"{other}_steps": other_steps,
        f"{other}_last_step": summary[other]["steps"][-1],
        "rlt_first": rlt_steps is not None and (other_steps is None or rlt_steps < other_steps),
        "ratio": None if rlt_steps is None else bound / rlt_steps,
        "ratio_is_lower_bound": other_steps is None,
    }


def print_curve(curve: Curve, width: int = 8) -> None:
    """One arm and seed's line (its evaluation points, its wall time) and its probe, if any."""
    cells = ", ".join(f"{step}:{rate:.2f}" for step, rate in zip(curve.steps, curve.success, strict=True))
    print(f"{curve.arm:>{width}} seed {curve.seed} ({curve.wall_s:.0f} s): {cells}", flush=True)
    if curve.probe:
        print(f"{'':>{width}} probe: " + json.dumps({k: round(v, 3) for k, v in curve.probe.items()}))


def print_summary(summary: dict, width: int = 8) -> None:
    """Each arm's mean success ± 95% interval at every evaluation point (``summarize``'s), with the number of
    seeds behind a point where fewer than all of the arm's runs reached it."""
    for arm, data in summary.items():
        counts = data["seeds_at"]
        cells = ", ".join(
            f"{step}: {mean:.2f} ± {half:.2f}" + (f" (n={n})" if n != data["seeds"] else "")
            for step, mean, half, n in zip(data["steps"], data["mean"], data["ci95"], counts, strict=True)
        )
        print(f"{arm:>{width}} mean ± 95% CI over {data['seeds']} seeds — {cells}")


def main(config: BenchmarkConfig, summarize_only: bool = False) -> dict:
    """Run every arm of ``config.arms`` for every seed of ``config.seeds`` (``summarize_only``: run nothing),
    then summarize every per-seed file these settings have on disk (``saved_curves``: other arms and seeds run
    before, finished or not, so a run of one arm and seed never drops the rest from the summary), print the table
    and write JSON + PNG to ``config.output``."""
    torch.set_num_threads(1)
    if not summarize_only:
        for arm in config.arms:
            for seed in config.seeds:
                run_cached(config, arm, seed)
    curves = saved_curves(config)
    for curve in curves:
        print_curve(curve)
    config = replace(
        config,
        arms=tuple(dict.fromkeys(curve.arm for curve in curves)),
        seeds=tuple(sorted({curve.seed for curve in curves})),
    )
    summary = summarize(curves)
    print_summary(summary)
    verdict = targets(curves, summary) if "rlt" in summary else {}
    print("targets:", json.dumps(verdict))
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    stem = f"rlt_sample_efficiency_{config.task}" + (f"_{config.tag}" if config.tag else "")
    result = {
        "config": asdict(config),
        "curves": [asdict(curve) for curve in curves],
        "summary": summary,
        "targets": verdict,
    }
    (output / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(summary, config, output / f"{stem}.png")
    if config.mlflow_uri:
        log_to_mlflow(config, summary, output / stem)
    return result


def saved_curves(config: BenchmarkConfig) -> list[Curve]:
    """Every result file under these settings (``curve_path``), whatever seeds it was run with: the arms of
    ``config.arms`` first, then the rest of ``ARMS``, seeds in order."""
    curves = []
    for arm in dict.fromkeys([*config.arms, *ARMS]):
        files = curve_path(config, arm, 0).parent.glob(f"{arm}_seed*.json")
        for path in sorted(files, key=lambda path: int(path.stem.removeprefix(f"{arm}_seed"))):
            curves.append(saved_curve(path))
    return curves


def saved_curve(path: Path) -> Curve:
    """The curve in result file ``path``, finished or not (an unfinished one is announced)."""
    saved = json.loads(path.read_text())
    curve = Curve(**saved["curve"])
    if not saved.get("complete", True):
        print(f"{curve.arm} seed {curve.seed}: unfinished, {curve.steps[-1] if curve.steps else 0} env steps so far")
    return curve


def log_to_mlflow(config: BenchmarkConfig, summary: dict, stem: Path) -> str | None:
    """One run of experiment ``flywheel/rlt_sample_efficiency`` in ``config.mlflow_uri``: the config as
    params, each arm's final mean success as a metric, the summary JSON and plot and every (arm, seed) curve
    JSON as artifacts. Returns the run id (None, with a warning, if the store cannot be written)."""
    curves = [curve_path(config, arm, seed) for arm in config.arms for seed in config.seeds]
    curves = [path for path in curves if path.exists()]
    run_id = log_command_run(
        "rlt_sample_efficiency",
        asdict(config),
        {f"final_success.{arm}": data["mean"][-1] for arm, data in summary.items()},
        tags={"task": config.task},
        artifacts={"": [stem.with_suffix(".json"), stem.with_suffix(".png")], "curves": curves},
        tracking_uri=config.mlflow_uri,
    )
    print(
        f"MLflow: run {run_id} in {config.mlflow_uri}" if run_id else "MLflow: not logged (see the warning)"
    )
    return run_id


def parse_args() -> tuple[BenchmarkConfig, argparse.Namespace]:
    """Command-line flags → ``BenchmarkConfig`` and the ``--prior-table`` mode's flags."""
    defaults = BenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=defaults.task)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--env-steps", type=int, default=defaults.env_steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes)
    parser.add_argument("--episode-steps", type=int, default=defaults.episode_steps)
    parser.add_argument("--prior-noise", type=float, default=defaults.prior_noise)
    parser.add_argument(
        "--prior-goal-bias",
        type=float,
        default=defaults.prior_goal_bias,
        help="aim the scripted prior this far (m) off the goal along x: a consistently-off prior",
    )
    parser.add_argument(
        "--success-tolerance",
        type=float,
        default=defaults.success_tolerance,
        help="harder-tolerance variant: success when the task's distance is ≤ this (envs.TOLERANCE_PAIRS)",
    )
    parser.add_argument(
        "--critical-distance",
        type=float,
        default=defaults.critical_distance,
        help="hand-off distance (≤ 0: RLT acts from the first chunk)",
    )
    parser.add_argument("--critical-pair", default=defaults.critical_pair, choices=sorted(HANDOFF_PAIRS))
    parser.add_argument("--warmup-episodes", type=int, default=defaults.warmup_episodes)
    parser.add_argument("--residual-scale", type=float, default=defaults.residual_scale)
    parser.add_argument(
        "--utd-ratio",
        type=int,
        default=defaults.utd_ratio,
        help="critic updates per chunk (RLT and residual)",
    )
    parser.add_argument("--beta", type=float, default=defaults.beta, help="RLT's weight of ‖a − ã‖²")
    parser.add_argument(
        "--actor-q", default=defaults.actor_q, choices=["q1", "min"], help="critic value RLT's actor climbs"
    )
    parser.add_argument(
        "--no-normalize-state",
        dest="normalize_state",
        action="store_false",
        help="feed RLT and residual the raw RL state (default: standardized with warm-up statistics)",
    )
    parser.add_argument(
        "--token-steps", type=int, default=defaults.token_steps, help="gradient steps fitting the RL token"
    )
    parser.add_argument(
        "--prior-bias",
        type=float,
        default=defaults.prior_bias,
        help="the scripted prior misjudges a position by this much (m): a systematic error (PRIOR_BIASES)",
    )
    parser.add_argument(
        "--prior-bias-at",
        default=defaults.prior_bias_at,
        help="where --prior-bias applies, '<object|goal>:<±x|y|z>' (default: the task's PRIOR_BIASES entry)",
    )
    parser.add_argument("--arms", nargs="+", default=list(defaults.arms), choices=sorted(ARMS))
    parser.add_argument("--output", default=defaults.output)
    parser.add_argument(
        "--mlflow-uri",
        default=defaults.mlflow_uri,
        help="also log the plot, summary and per-seed curves as artifacts of a run in this MLflow store",
    )
    parser.add_argument(
        "--precision-handoff",
        action="store_true",
        help="hand off at the task's grasp approach (envs.metaworld_env.PRECISION_HANDOFFS), not --critical-*",
    )
    parser.add_argument("--demos", type=int, default=defaults.demos, help="the RLPD arm's expert episodes")
    parser.add_argument("--demo-noise", type=float, default=defaults.demo_noise)
    parser.add_argument("--rlpd-critics", type=int, default=defaults.rlpd_critics)
    parser.add_argument(
        "--rlpd-utd", type=int, default=defaults.rlpd_utd, help="RLPD gradient steps per env step"
    )
    parser.add_argument(
        "--rlpd-recipe",
        choices=sorted(RLPD_RECIPES),
        default=defaults.rlpd_recipe,
        help="the RLPD arm's SAC settings: sb3 (SB3's defaults) or serl (no entropy bonus in the target, "
        "temperature from 0.01, γ 0.97, actor on the ensemble mean)",
    )
    parser.add_argument(
        "--recipe",
        type=Path,
        help="the learner arms' RLT settings: a YAML file of rlt.config.RLTConfig (its online and learner "
        "blocks apply; e.g. configs/rlt-recipe.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="override one recipe setting, e.g. --set learner.critic_layer_norm=false (repeatable)",
    )
    parser.add_argument("--tag", default=defaults.tag, help="suffix of the summary's file names")
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="run nothing: summarize, plot (and log to MLflow) every per-seed file these settings have, "
        "unfinished ones included (a run summarizes them too, after its own --arms and --seeds)",
    )
    parser.add_argument(
        "--prior-table",
        action="store_true",
        help="instead of the arms: the clean expert's and the prior's success at each of --biases on --tasks, "
        "written to <output>/biased_priors.txt",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=[defaults.task], help="--prior-table's tasks (task or task@object:+x)"
    )
    parser.add_argument(
        "--biases", type=float, nargs="+", default=[0.0, 0.01, 0.015], help="--prior-table's biases (m)"
    )
    args = parser.parse_args()
    try:
        recipe = read_recipe(args.recipe, args.overrides)
    except UserError as error:
        parser.error(str(error))
    return BenchmarkConfig(
        task=args.task,
        seeds=tuple(args.seeds),
        env_steps=args.env_steps,
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        episode_steps=args.episode_steps,
        prior_noise=args.prior_noise,
        prior_goal_bias=args.prior_goal_bias,
        success_tolerance=args.success_tolerance,
        critical_distance=args.critical_distance if args.critical_distance > 0 else None,
        critical_pair=args.critical_pair,
        warmup_episodes=args.warmup_episodes,
        residual_scale=args.residual_scale,
        utd_ratio=args.utd_ratio,
        beta=args.beta,
        actor_q=args.actor_q,
        normalize_state=args.normalize_state,
        token_steps=args.token_steps,
        prior_bias=args.prior_bias,
        prior_bias_at=args.prior_bias_at,
        arms=tuple(args.arms),
        output=args.output,
        mlflow_uri=args.mlflow_uri,
        precision_handoff=args.precision_handoff,
        demos=args.demos,
        demo_noise=args.demo_noise,
        rlpd_critics=args.rlpd_critics,
        rlpd_utd=args.rlpd_utd,
        rlpd_recipe=args.rlpd_recipe,
        recipe=recipe,
        tag=args.tag,
    ), args


def read_recipe(path: Path | None, overrides: list[str] | None) -> dict[str, dict[str, Any]]:
    """The ``online`` and ``learner`` settings that ``path`` (an ``RLTConfig`` YAML) and ``overrides`` set,
    validated as ``flywheel rlt --config/--set`` validates them; settings left at their defaults are left out."""
    if path is None and not overrides:
        return {}
    config = rlt_config(path, {}, overrides)
    blocks = {"online": config.online, "learner": config.learner}
    return {
        name: block.model_dump(mode="json", exclude_unset=True)
        for name, block in blocks.items()
        if block.model_fields_set
    }


if __name__ == "__main__":
    benchmark, flags = parse_args()
    if flags.prior_table:
        table = prior_table(benchmark, flags.tasks, flags.biases)
        Path(benchmark.output).mkdir(parents=True, exist_ok=True)
        Path(benchmark.output, "biased_priors.txt").write_text(table)
    else:
        main(benchmark, summarize_only=flags.summarize)
