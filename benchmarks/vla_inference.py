"""Chunk inference latency of the built-in VLA on CPU: batch 1 and 16, Euler steps 1/5/10, vs prefix-only cost.

The baseline measured in the same run is the model's forward-only cost: encoding the prefix (image + prompt
through the backbone) without any denoising. Latency does not depend on the weights, so the model is freshly
initialized. Median of ``--repeats`` calls after one warm-up.

    python benchmarks/vla_inference.py --sizes tiny small --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from policies.normalization import NormalizationStats
from policies.vla import VLAConfig, VLAModel, VLAPolicy, train_prompt_tokenizer

PROMPTS = ["reach the goal position", "pull the drawer open", "press the button from the top"]


def build_policy(size: str, image_size: int, cameras: int) -> VLAPolicy:
    """A freshly initialized policy of the given size (tokenizer fitted on a few Meta-World prompts)."""
    tokenizer = train_prompt_tokenizer(PROMPTS)
    names = ("corner2", "gripperPOV", "topview")[:cameras]
    config = VLAConfig.preset(
        size, cameras=names, image_size=image_size, state_dim=7, vocab_size=tokenizer.get_vocab_size()
    )
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.normal(size=(100, 7)), rng.uniform(-1, 1, size=(100, 4)))
    return VLAPolicy(VLAModel(config).eval(), tokenizer, stats)


def make_batch(policy: VLAPolicy, batch: int) -> dict:
    """A random observation batch matching the policy's cameras and sizes."""
    rng = np.random.default_rng(batch)
    side = policy.config.image_size
    return {
        "images": {
            camera: rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
            for camera in policy.config.cameras
        },
        "state": rng.normal(size=(batch, policy.config.state_dim)).astype(np.float32),
        "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(batch)],
    }


def median_ms(call, repeats: int) -> float:
    """Median wall time of ``call()`` in milliseconds after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(
    sizes: list[str], batches: list[int], steps: list[int], image_size: int, cameras: int, repeats: int
) -> None:
    """Print one table per model size."""
    for size in sizes:
        policy = build_policy(size, image_size, cameras)
        params = sum(p.numel() for p in policy.model.parameters()) / 1e6
        print(
            f"\n{size}: {params:.2f} M parameters, {cameras} camera(s) at {image_size} px, "
            f"prefix {policy.config.prefix_len} tokens, H={policy.config.action_horizon}, threads "
            f"{torch.get_num_threads()}"
        )
        print(
            f"{'batch':>5} {'prefix-only ms':>15} "
            + " ".join(f"{f'{n} steps ms':>12}" for n in steps)
            + f" {'ms/chunk@10':>12}"
        )
        for batch in batches:
            observations = make_batch(policy, batch)
            with torch.no_grad():
                prefix_ms = median_ms(lambda obs=observations, p=policy: p.encode(obs), repeats)
            chunk_ms = [
                median_ms(lambda obs=observations, n=n, p=policy: p.infer(obs, num_steps=n), repeats)
                for n in steps
            ]
            per_chunk = chunk_ms[-1] / batch
            print(
                f"{batch:>5} {prefix_ms:>15.1f} "
                + " ".join(f"{ms:>12.1f}" for ms in chunk_ms)
                + f" {per_chunk:>12.1f}"
            )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and print latency tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.sizes, args.batches, args.steps, args.image_size, args.cameras, args.repeats)


if __name__ == "__main__":
    main()
