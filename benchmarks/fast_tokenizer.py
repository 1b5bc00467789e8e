"""FAST tokenizer vs naive per-dimension 256-bin tokenization: tokens per chunk and reconstruction error.

Chunks (H = 10) come from Meta-World scripted experts (``envs.ScriptedExpert``, image-free envs) on several tasks;
``--synthetic`` uses smooth random trajectories instead. The tokenizer is fitted on 80% of the chunks and measured
on the held-out 20%.

    python benchmarks/fast_tokenizer.py --tasks reach-v3 push-v3 pick-place-v3 drawer-open-v3 --episodes 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from policies.fast import FASTTokenizer, naive_bin_detokenize, naive_bin_tokenize
from policies.training import chunk_episode


def expert_chunks(tasks: list[str], episodes: int, noise_std: float, horizon: int, seed: int) -> np.ndarray:
    """Full (unpadded) action chunks from scripted-expert episodes of each task."""
    from envs import EnvConfig, MetaWorldEnv, ScriptedExpert

    chunks = []
    for task in tasks:
        env = MetaWorldEnv(EnvConfig(task=task, render=False, seed=seed))
        expert = ScriptedExpert(task, noise_std=noise_std, seed=seed)
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            actions, done = [], False
            while not done:
                action = expert.act(obs["privileged"])
                actions.append(action)
                obs, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
            episode_chunks, mask = chunk_episode(np.stack(actions), horizon)
            chunks.append(episode_chunks[mask.all(axis=1)])
        env.close()
    return np.concatenate(chunks)


def synthetic_chunks(count: int, horizon: int, dim: int, seed: int) -> np.ndarray:
    """Smooth random trajectories: sums of two random sinusoids per dimension."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, horizon)[None, :, None]
    total = np.zeros((count, horizon, dim))
    for _ in range(2):
        total += rng.uniform(0.1, 0.6, (count, 1, dim)) * np.sin(
            2 * np.pi * rng.uniform(0.1, 1.0, (count, 1, dim)) * t
            + rng.uniform(0, 2 * np.pi, (count, 1, dim))
        )
    return total.astype(np.float32)


def measure(chunks: np.ndarray, vocab_size: int, scale: float, seed: int) -> None:
    """Fit on 80%, report held-out tokens per chunk and errors for FAST and naive binning."""
    order = np.random.default_rng(seed).permutation(len(chunks))
    split = int(0.8 * len(chunks))
    train, test = chunks[order[:split]], chunks[order[split:]]
    start = time.perf_counter()
    tokenizer = FASTTokenizer.fit(train, vocab_size=vocab_size, scale=scale)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    ids = tokenizer.encode(test)
    decoded = tokenizer.decode(ids)
    codec_ms = (time.perf_counter() - start) * 1e3 / len(test)
    naive = naive_bin_detokenize(
        naive_bin_tokenize(test, tokenizer.q01, tokenizer.q99), tokenizer.q01, tokenizer.q99
    )
    lengths = np.array([len(row) for row in ids])
    rows = [
        ("FAST (DCT+BPE)", lengths.mean(), np.percentile(lengths, 95), _errors(decoded.actions, test)),
        ("naive 256-bin", float(test[0].size), float(test[0].size), _errors(naive, test)),
    ]
    print(
        f"chunks: {len(train)} fit / {len(test)} held out, shape {test.shape[1:]}; BPE vocab {tokenizer.vocab_size},"
        f" scale {scale}; fit {fit_s:.2f} s, encode+decode {codec_ms:.3f} ms/chunk; all decoded valid: "
        f"{bool(decoded.valid.all())}"
    )
    print(f"{'tokenizer':<16} {'tokens/chunk':>12} {'p95':>6} {'MAE':>9} {'RMSE':>9} {'max err':>9}")
    for name, mean, p95, (mae, rmse, worst) in rows:
        print(f"{name:<16} {mean:>12.1f} {p95:>6.0f} {mae:>9.5f} {rmse:>9.5f} {worst:>9.5f}")
    print(f"compression: {rows[1][1] / rows[0][1]:.1f}x fewer tokens than naive binning")


def _errors(decoded: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    error = decoded - reference
    return float(np.abs(error).mean()), float(np.sqrt((error**2).mean())), float(np.abs(error).max())


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", default=["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3"]
    )
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--noise-std", type=float, default=0.1)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--synthetic", action="store_true", help="smooth synthetic trajectories instead of experts"
    )
    args = parser.parse_args(argv)
    if args.synthetic:
        print("source: smooth synthetic trajectories (4-D, sums of sinusoids)")
        chunks = synthetic_chunks(4000, args.horizon, 4, args.seed)
    else:
        print(
            f"source: Meta-World scripted experts {args.tasks}, {args.episodes} episodes each, noise {args.noise_std}"
        )
        chunks = expert_chunks(args.tasks, args.episodes, args.noise_std, args.horizon, args.seed)
    measure(chunks, args.vocab_size, args.scale, args.seed)


if __name__ == "__main__":
    main()
