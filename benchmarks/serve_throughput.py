"""Policy-server throughput: flywheel's batched server vs a one-request-at-a-time loop in openpi's style.

Both servers run in their own process with the same policy (the built-in VLA at its tiny size by default, or a
torch MLP whose cost is a fixed overhead plus a small per-item cost) on one torch thread, and speak the same
openpi protocol. 1, 4 and 16 clients (threads of this process, each an ``OpenPIClientPolicy``) send lock-step
requests; the benchmark prints requests/s and p50/p99 latency per server and client count, the mean batch
the policy saw, the p99 latency of ``GET /healthz`` probes sent during the run (openpi's server answers them
only between inferences), and the batched server's speed-up over the baseline measured in the same run. A third row,
flywheel's server with ``max_batch=1``, separates the gain of batching from that of the worker thread.

    python benchmarks/serve_throughput.py [--policy vla|mlp] [--clients 1 4 16] [--requests 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import http
import multiprocessing
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np

from policies.base import ActionChunk, Observation, ObservationBatch, Policy, stack_observations
from policies.openpi_client import OpenPIClientPolicy
from policies.serving import ObservationSpec, PolicyServer, ServerConfig, msgpack_numpy, observation_from_wire

PROMPT = "push the puck to the goal"
CAMERA = "corner"
STATE_DIM = 4


class MLPPolicy:
    """A torch MLP over a pooled image + state: one call costs a fixed overhead plus a small per-item cost."""

    def __init__(self, width: int = 1024, depth: int = 8, horizon: int = 10, seed: int = 0) -> None:
        import torch

        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = [torch.nn.Linear(3 * 64 + STATE_DIM, width), torch.nn.GELU()]
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, horizon * 4)).eval()
        self.version, self.action_horizon, self.action_dim = "mlp-bench", horizon, 4
        self.cameras, self.image_size, self.state_dim = (CAMERA,), 96, STATE_DIM

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        import torch

        images = torch.from_numpy(batch["images"][CAMERA]).float().permute(0, 3, 1, 2) / 255.0
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)
        with torch.no_grad():
            out = self.net(torch.cat([pooled, torch.from_numpy(batch["state"])], dim=1))
        return ActionChunk(actions=out.reshape(-1, self.action_horizon, self.action_dim).numpy())

    def reset(self) -> None:
        pass


def build_policy(name: str) -> Policy:
    """The benchmark policy, seeded: ``vla`` (built-in VLA, tiny preset, untrained weights) or ``mlp``."""
    if name == "mlp":
        return MLPPolicy()
    import torch

    from policies.normalization import NormalizationStats
    from policies.vla import VLAConfig, VLAModel, VLAPolicy, train_prompt_tokenizer

    rng = np.random.default_rng(0)
    tokenizer = train_prompt_tokenizer([PROMPT], vocab_size=128)
    config = VLAConfig.preset("tiny", cameras=(CAMERA,), vocab_size=tokenizer.get_vocab_size())
    stats = NormalizationStats.compute(
        rng.normal(size=(256, STATE_DIM)).astype(np.float32),
        rng.normal(size=(256, config.action_horizon, config.action_dim)).astype(np.float32),
    )
    torch.manual_seed(0)
    return VLAPolicy(VLAModel(config), tokenizer, stats, version="vla-tiny-bench")


def make_observation(rng: np.random.Generator, image_size: int) -> Observation:
    return Observation(
        images={CAMERA: rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)},
        state=rng.normal(size=STATE_DIM).astype(np.float32),
        prompt=PROMPT,
    )


# ---- servers (each in its own process) ------------------------------------------------------------


def run_flywheel_server(policy_name: str, port: int, max_batch: int, max_wait_ms: float) -> None:
    """flywheel's server: batched (``max_batch`` > 1), inference in a worker thread."""
    import torch

    torch.set_num_threads(1)
    config = ServerConfig(port=port, max_batch=max_batch, max_wait_ms=max_wait_ms)
    PolicyServer(build_policy(policy_name), config).serve_forever()


def run_openpi_style_server(policy_name: str, port: int, max_batch: int, max_wait_ms: float) -> None:
    """The baseline, like openpi's ``WebsocketPolicyServer``: each handler calls ``infer`` inline on the event
    loop, one request at a time (same codec, same observation checks, no batching)."""
    import torch
    from websockets.asyncio.server import serve

    torch.set_num_threads(1)
    policy = build_policy(policy_name)
    spec = ObservationSpec.of(policy)
    metadata = {"policy_version": policy.version, "action_horizon": policy.action_horizon}
    metadata["action_dim"] = policy.action_dim

    async def handler(connection) -> None:
        await connection.send(msgpack_numpy.packb(metadata))
        async for message in connection:
            started = time.monotonic()
            observation = observation_from_wire(msgpack_numpy.unpackb(message), spec)
            chunk = policy.infer(stack_observations([observation]))
            timing = {"infer_ms": (time.monotonic() - started) * 1000, "batch_size": 1}
            reply = {"actions": chunk.actions[0], "server_timing": timing, "policy_version": policy.version}
            await connection.send(msgpack_numpy.packb(reply))

    def health(connection, request):  # openpi's /healthz check
        return connection.respond(http.HTTPStatus.OK, "OK\n") if request.path == "/healthz" else None

    async def main() -> None:
        options = {"compression": None, "max_size": None, "process_request": health}
        async with serve(handler, "127.0.0.1", port, **options) as server:
            await server.serve_forever()

    asyncio.run(main())


def run_flywheel_unbatched_server(policy_name: str, port: int, max_batch: int, max_wait_ms: float) -> None:
    """flywheel's server with batching off (``max_batch=1``): isolates what batching alone buys."""
    run_flywheel_server(policy_name, port, 1, 0.0)


SERVERS = {
    "openpi-style loop": run_openpi_style_server,
    "flywheel max_batch=1": run_flywheel_unbatched_server,
    "flywheel batched": run_flywheel_server,
}


# ---- load generation ------------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    clients: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    health_p99_ms: float


@dataclass
class Run:
    """One load run: wall time (s), request latencies (ms), reported batch sizes, /healthz latencies (ms)."""

    wall: float
    latencies: list[float]
    batches: list[int]
    health: list[float]


def probe_health(url: str, done: threading.Event, latencies: list[float]) -> None:
    """GET /healthz every 20 ms until ``done``, recording how long each answer took."""
    health_url = url.replace("ws://", "http://") + "/healthz"
    while not done.is_set():
        sent = time.perf_counter()
        with urllib.request.urlopen(health_url, timeout=60) as response:
            response.read()
        latencies.append((time.perf_counter() - sent) * 1000)
        done.wait(0.02)


def drive(url: str, clients: int, requests: int, image_size: int, seed: int) -> Run:
    """``clients`` lock-step clients send ``requests`` each after one warm-up, while /healthz is probed."""
    connections = [OpenPIClientPolicy(url, connect_timeout_s=120) for _ in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    batches: list[list[int]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def run(index: int) -> None:
        rng = np.random.default_rng(seed + index)
        client = connections[index]
        client.infer_one(make_observation(rng, image_size))
        start.wait()
        for _ in range(requests):
            sent = time.perf_counter()
            reply = client.infer_one(make_observation(rng, image_size))
            latencies[index].append((time.perf_counter() - sent) * 1000)
            batches[index].append(int(reply["server_timing"]["batch_size"]))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    done, health = threading.Event(), []
    prober = threading.Thread(target=probe_health, args=(url, done, health))
    prober.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    done.set()
    prober.join()
    for client in connections:
        client.close()
    return Run(wall, [x for row in latencies for x in row], [b for row in batches for b in row], health)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_servers(args: argparse.Namespace) -> dict[str, tuple[multiprocessing.Process, str]]:
    """Every server in its own process (idle ones cost no CPU), so runs can be interleaved."""
    context = multiprocessing.get_context("spawn")
    servers = {}
    for name, target in SERVERS.items():
        port = free_port()
        process_args = (args.policy, port, args.max_batch, args.max_wait_ms)
        process = context.Process(target=target, args=process_args, daemon=True)
        process.start()
        servers[name] = (process, f"ws://127.0.0.1:{port}")
    return servers


def measure(
    servers: dict[str, tuple[multiprocessing.Process, str]], args: argparse.Namespace
) -> list[Result]:
    """For each client count, ``--rounds`` rounds over the servers in alternating order (so drifting load
    on a shared machine hits every server alike); latencies and wall time are pooled over rounds."""
    results = []
    for clients in args.clients:
        pooled = {name: Run(0.0, [], [], []) for name in servers}
        for round_index in range(args.rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for name in order:
                run = drive(servers[name][1], clients, args.requests, 96, args.seed)
                total = pooled[name]
                pooled[name] = Run(
                    total.wall + run.wall,
                    total.latencies + run.latencies,
                    total.batches + run.batches,
                    total.health + run.health,
                )
        for name, run in pooled.items():
            results.append(
                Result(
                    server=name,
                    clients=clients,
                    requests_per_s=len(run.latencies) / run.wall,
                    p50_ms=float(np.percentile(run.latencies, 50)),
                    p99_ms=float(np.percentile(run.latencies, 99)),
                    mean_batch=float(np.mean(run.batches)),
                    health_p99_ms=float(np.percentile(run.health, 99)) if run.health else float("nan"),
                )
            )
            print(_row(results[-1]), flush=True)
    return results


def _row(result: Result) -> str:
    return (
        f"{result.server:<20} {result.clients:>7} {result.requests_per_s:>9.2f} {result.p50_ms:>9.1f} "
        f"{result.p99_ms:>9.1f} {result.mean_batch:>10.2f} {result.health_p99_ms:>14.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", choices=["vla", "mlp"], default="vla")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=12, help="requests per client")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per client count")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"policy={args.policy}  requests/client/round={args.requests}  rounds={args.rounds}  (1 torch thread)"
    )
    print(
        f"{'server':<20} {'clients':>7} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>10} {'healthz p99 ms':>14}"
    )
    servers = start_servers(args)
    try:
        results = measure(servers, args)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.join(30)
    by_key = {(result.server, result.clients): result for result in results}
    print("\nspeed-up of the batched server over the openpi-style loop (same run):")
    for clients in args.clients:
        baseline, batched = by_key["openpi-style loop", clients], by_key["flywheel batched", clients]
        speedup = batched.requests_per_s / baseline.requests_per_s
        print(
            f"  {clients:>2} clients: {speedup:.2f}× throughput, p99 {baseline.p99_ms:.0f} → "
            f"{batched.p99_ms:.0f} ms"
        )


if __name__ == "__main__":
    main()
