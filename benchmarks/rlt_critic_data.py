"""Is the experience enough for RLT's critic? Its TD critic against a Monte-Carlo critic fitted on the same chunks.

Runs RLT's online loop (the settings of ``rlt_sample_efficiency.py``) for ``--env-steps`` after warm-up and keeps
every episode. A fresh critic of the learner's size (2 × 256, same state standardization) is then fitted by plain
regression on the discounted Monte-Carlo returns of the critical chunks (80% of them; the other 20% are held
out). Both critics judge the same probe: at the critical chunk starts of the first evaluation episodes, played
by the prior, does Q prefer the noise-free expert's chunk to the prior's noisy ``ã``?

If the supervised critic cannot rank them either, the data does not pin down how a chunk changes the outcome
and no change to the TD update will; if it can, the TD update is what fails.

The ground truth comes from branching the simulator (the env is deterministic given its seed and actions, so
replaying an episode's action prefix restores the state): at the first critical chunk of each probe episode,
``--branch-rollouts`` continuations after the clean chunk and after ``ã``, both continued by the noisy prior
(common noise seeds), give the true advantage ``Q^prior(clean) − Q^prior(ã)`` that a critic trained on the
prior's data should see.

    python benchmarks/rlt_critic_data.py --seeds 0 1 2 --env-steps 10000
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch
from rlt_sample_efficiency import BenchmarkConfig, critical_chunks, make_env, make_loop, rlt_learner
from scipy import stats
from tqdm import tqdm

from envs import MetaWorldEnv
from envs.scripted import ScriptedPolicy
from policies.base import stack_observations
from rlt.diagnostics import chunk_returns
from rlt.online import EpisodeChunks, OnlineRLT
from rlt.td3 import LearnerConfig

#: The learner's discount (the benchmark keeps the default), used for the branched returns too.
GAMMA = LearnerConfig().gamma


@dataclass
class CriticDataResult:
    """One seed: data size, the Monte-Carlo critic's fit, and both critics on the probe."""

    seed: int
    critical_chunks: int
    episodes: int
    mc_heldout_spearman: float
    td_heldout_spearman: float
    probe_chunks: int
    mc_prefers_clean: float
    td_prefers_clean: float
    mc_q_clean_minus_reference: float
    td_q_clean_minus_reference: float
    branch_states: int
    true_advantage: float
    true_advantage_positive: float
    mc_advantage_at_branch_states: float
    td_advantage_at_branch_states: float


def collect(config: BenchmarkConfig, seed: int, env_steps: int) -> tuple[OnlineRLT, list[EpisodeChunks]]:
    """RLT's warm-up and ``env_steps`` online steps; the learner and every episode's chunks."""
    loop = make_loop(config, seed, "rlt", rlt_learner(config, seed), exploration_noise=0.2)
    played = loop.play("prior", config.warmup_episodes)
    loop.rlt.warm_up(played)
    end = loop.env_steps + env_steps
    with tqdm(total=env_steps, desc=f"seed {seed} online", unit="step") as bar:
        while loop.env_steps < end:
            before = loop.env_steps
            records = loop.play("learner", 1)
            loop.rlt.learn(records)
            played.extend(records)
            bar.update(loop.env_steps - before)
    return loop.rlt, loop.rlt.episode_chunks(played)


def replay_data(loop: OnlineRLT, episodes: list[EpisodeChunks]) -> tuple[np.ndarray, ...]:
    """States, references, executed chunks and Monte-Carlo returns of every critical chunk."""
    states, references, chunks, returns = [], [], [], []
    for episode in episodes:
        for step, value in zip(episode.steps, chunk_returns(episode, GAMMA), strict=True):
            if step.critical:
                context = step.context
                states.append(loop.encoder.encode(context.embeddings[None], context.proprio[None])[0])
                references.append(context.reference)
                chunks.append(step.executed)
                returns.append(value)
    return tuple(np.asarray(values, np.float32) for values in (states, references, chunks, returns))


class MonteCarloCritic(torch.nn.Module):
    """``Q(x, a)`` regressed on Monte-Carlo returns; ``x`` standardized like the learner's critic."""

    def __init__(self, loop: OnlineRLT, width: int = 256) -> None:
        super().__init__()
        features = loop.learner.critic.features_extractor
        self.mean, self.std = features.state_mean.clone(), features.state_std.clone()
        inputs = loop.learner.state_dim + loop.chunk_size * loop.learner.action_dim
        self.net = torch.nn.Sequential(
            torch.nn.Linear(inputs, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, 1),
        )

    def forward(self, states: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([(states - self.mean) / self.std, chunks.flatten(1)], dim=1))[:, 0]

    def values(self, states: np.ndarray, chunks: np.ndarray) -> np.ndarray:
        """Q of ``B×C×D`` chunks at RL states ``B×S``."""
        with torch.no_grad():
            return self(torch.as_tensor(states), torch.as_tensor(chunks, dtype=torch.float32)).numpy()


def fit_monte_carlo_critic(
    loop: OnlineRLT, data: tuple[np.ndarray, ...], steps: int, seed: int
) -> tuple[MonteCarloCritic, np.ndarray]:
    """Fit on 80% of the chunks (Adam 3e-4, batch 256); return the critic and the held-out indices."""
    states, _, chunks, returns = data
    order = np.random.default_rng(seed).permutation(len(states))
    train, held_out = order[: int(0.8 * len(order))], order[int(0.8 * len(order)) :]
    torch.manual_seed(seed)
    critic = MonteCarloCritic(loop)
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-4)
    generator = np.random.default_rng(seed)
    tensors = [torch.as_tensor(values) for values in (states, chunks, returns)]
    for _ in tqdm(range(steps), desc=f"seed {seed} MC critic", unit="step", leave=False):
        batch = torch.as_tensor(generator.choice(train, min(256, len(train))))
        loss = ((critic(tensors[0][batch], tensors[1][batch]) - tensors[2][batch]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return critic, held_out


def probe(
    loop: OnlineRLT, critic: MonteCarloCritic, config: BenchmarkConfig, episodes: int, branch_rollouts: int
) -> dict[str, float]:
    """Both critics' verdict on the clean expert chunk vs ``ã`` at the critical chunk starts of prior episodes,
    and the branched ground truth at the first critical chunk of each episode."""
    rows = []
    for start in critical_chunks(loop, config, episodes, learner_acts=False):
        context = start.context
        pair = np.stack([context.reference, start.clean])
        state = loop.encoder.encode(context.embeddings[None], context.proprio[None]).repeat(2, axis=0)
        mc = critic.values(state, pair)
        td = loop.learner.q_values(state, pair[:1].repeat(2, axis=0), pair)
        truth = None
        if start.first and branch_rollouts:
            truth = true_advantage(config, start.episode_seed, start.prefix, pair, branch_rollouts)
        rows.append((mc[1] - mc[0], td[1] - td[0], truth))
    mc_diff, td_diff = (np.array([row[index] for row in rows]) for index in (0, 1))
    branched = np.array([row for row in rows if row[2] is not None], dtype=float).reshape(-1, 3)
    return {
        "probe_chunks": len(rows),
        "mc_prefers_clean": float(np.mean(mc_diff > 0)),
        "td_prefers_clean": float(np.mean(td_diff > 0)),
        "mc_q_clean_minus_reference": float(mc_diff.mean()),
        "td_q_clean_minus_reference": float(td_diff.mean()),
        "branch_states": len(branched),
        "true_advantage": float(branched[:, 2].mean()),
        "true_advantage_positive": float(np.mean(branched[:, 2] > 0)),
        "mc_advantage_at_branch_states": float(branched[:, 0].mean()),
        "td_advantage_at_branch_states": float(branched[:, 1].mean()),
    }


def true_advantage(
    config: BenchmarkConfig, episode_seed: int, prefix: list[np.ndarray], pair: np.ndarray, rollouts: int
) -> float:
    """``Q^prior(clean) − Q^prior(ã)`` at the state ``prefix`` leads to: mean branched return after ``pair[1]``
    minus after ``pair[0]``, each continued by the noisy prior with the same ``rollouts`` noise seeds."""
    env = make_env(config)
    returns = [
        [
            branched_return(env, config, episode_seed, prefix, chunk, noise_seed)
            for noise_seed in range(rollouts)
        ]
        for chunk in pair
    ]
    return float(np.mean(returns[1]) - np.mean(returns[0]))


def branched_return(
    env: MetaWorldEnv,
    config: BenchmarkConfig,
    episode_seed: int,
    prefix: list[np.ndarray],
    chunk: np.ndarray,
    noise_seed: int,
) -> float:
    """Discounted return in ``env`` after a reset to ``episode_seed``, replaying ``prefix``, executing ``chunk``,
    then the noisy prior (``noise_seed``)."""
    observation, _ = env.reset(seed=episode_seed)
    for action in prefix:
        observation, *_ = env.step(action)
    prior = ScriptedPolicy(
        config.task, noise_std=config.prior_noise, seed=1000 + noise_seed, action_horizon=config.chunk_size
    )
    plan, steps = list(chunk), 0
    while True:
        if not plan:
            plan = list(prior.infer(stack_observations([observation])).actions[0, : config.chunk_size])
        observation, _, terminated, truncated, _ = env.step(plan.pop(0))
        steps += 1
        if terminated or truncated:
            return float(terminated) * GAMMA ** (steps - 1)


def run_seed(
    config: BenchmarkConfig,
    seed: int,
    env_steps: int,
    fit_steps: int,
    probe_episodes: int,
    branch_rollouts: int,
) -> CriticDataResult:
    """One seed end to end."""
    loop, episodes = collect(config, seed, env_steps)
    data = replay_data(loop, episodes)
    critic, held_out = fit_monte_carlo_critic(loop, data, fit_steps, seed)
    states, references, chunks, returns = (values[held_out] for values in data)
    mc_spearman = stats.spearmanr(critic.values(states, chunks), returns).statistic
    td_spearman = stats.spearmanr(loop.learner.q_values(states, references, chunks), returns).statistic
    return CriticDataResult(
        seed=seed,
        critical_chunks=len(data[0]),
        episodes=len(episodes),
        mc_heldout_spearman=float(mc_spearman),
        td_heldout_spearman=float(td_spearman),
        **probe(loop, critic, config, probe_episodes, branch_rollouts),
    )


def main() -> None:
    """Parse flags, run every seed, print each result and the means, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="reach-v3")
    parser.add_argument("--success-tolerance", type=float, default=0.005)
    parser.add_argument("--critical-pair", default="hand-goal")
    parser.add_argument("--critical-distance", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--env-steps", type=int, default=10_000, help="online env steps after warm-up")
    parser.add_argument(
        "--fit-steps", type=int, default=20_000, help="gradient steps of the Monte-Carlo critic"
    )
    parser.add_argument("--probe-episodes", type=int, default=10)
    parser.add_argument(
        "--branch-rollouts", type=int, default=20, help="prior continuations per chunk for the true advantage"
    )
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = BenchmarkConfig(
        task=args.task,
        success_tolerance=args.success_tolerance,
        critical_pair=args.critical_pair,
        critical_distance=args.critical_distance,
        eval_episodes=args.probe_episodes,
    )
    results = []
    for seed in args.seeds:
        results.append(
            run_seed(config, seed, args.env_steps, args.fit_steps, args.probe_episodes, args.branch_rollouts)
        )
        print(
            json.dumps(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(results[-1]).items()}
            )
        )
    means = {k: float(np.mean([getattr(r, k) for r in results])) for k in asdict(results[0]) if k != "seed"}
    print("mean over seeds:", json.dumps({k: round(v, 3) for k, v in means.items()}))
    path = Path(args.output) / f"rlt_critic_data_{args.task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"args": vars(args), "seeds": [asdict(r) for r in results], "mean": means}, indent=1)
    )


if __name__ == "__main__":
    main()
