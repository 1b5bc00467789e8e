"""Dynamic batching of inference requests, so one model copy serves many rollout workers.

``BatchingInferenceServer`` is a plain asyncio class: concurrent ``infer`` calls are gathered (by
:class:`core.batching.DynamicBatcher`, the policy server's batcher too) until ``max_batch`` observations or
``max_wait_ms`` have passed, run as one ``policy.infer`` in a worker thread (the event loop stays free to accept
more requests), and split back. As a Ray async actor it serves every worker;
``ServedPolicy`` is the ``Policy`` a worker holds to talk to it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from core.batching import DynamicBatcher
from policies.base import ActionChunk, ObservationBatch, Policy, batch_size
from policies.device import place
from policies.rtc import InpaintingTargets, infer_with_targets, merge_targets


@dataclass
class ServedChunk:
    """A reply of the inference server: the chunk and the version of the weights that produced it."""

    chunk: ActionChunk
    version: str


@dataclass
class _Request:
    batch: ObservationBatch
    reply: asyncio.Future
    inpainting: InpaintingTargets | None = None


class BatchingInferenceServer:
    """Batches concurrent ``infer`` requests into single ``policy.infer`` calls."""

    def __init__(
        self, policy: Policy, max_batch: int = 32, max_wait_ms: float = 2.0, device: str = "cpu"
    ) -> None:
        self._batcher: DynamicBatcher[_Request] = DynamicBatcher(
            self._run_batch, max_batch, max_wait_ms, size=lambda request: batch_size(request.batch)
        )
        self.device = device
        self.policy = place(policy, device)
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.batch_sizes: list[int] = []

    def set_policy(self, policy: Policy) -> str:
        """Serve a new policy from the next batch on (placed on this server's device); returns its version."""
        self.policy = place(policy, self.device)
        return policy.version

    def metadata(self) -> dict[str, object]:
        """The served policy's identity and shapes."""
        return {
            "version": self.policy.version,
            "action_horizon": self.policy.action_horizon,
            "action_dim": self.policy.action_dim,
        }

    def stats(self) -> dict[str, float]:
        """How many batches ran and their mean size (in observations)."""
        sizes = self.batch_sizes or [0]
        return {"batches": float(len(self.batch_sizes)), "mean_batch": float(np.mean(sizes))}

    async def infer(
        self, batch: ObservationBatch, inpainting: InpaintingTargets | None = None
    ) -> ServedChunk:
        """Queue a batch of observations (with optional RTC targets, one row each) and wait for its chunk."""
        reply = asyncio.get_running_loop().create_future()
        await self._batcher.put(_Request(batch, reply, inpainting))
        return await reply

    async def _run_batch(self, requests: list[_Request]) -> None:
        """One ``policy.infer`` over the concatenated requests (with merged RTC targets), split back."""
        try:
            policy = self.policy
            merged = _concat_batches([request.batch for request in requests])
            targets = merge_targets(
                [request.inpainting for request in requests],
                [batch_size(request.batch) for request in requests],
                policy.action_horizon,
                policy.action_dim,
            )
            chunk = await asyncio.to_thread(infer_with_targets, policy, merged, targets)
        except Exception as error:  # every waiting caller sees the failure, the server keeps serving
            for request in requests:
                request.reply.set_exception(error)
            return
        self.batch_sizes.append(batch_size(merged))
        for request, part in zip(requests, _split_chunk(chunk, requests), strict=True):
            request.reply.set_result(ServedChunk(part, policy.version))


class ServedPolicy:
    """A ``Policy`` whose ``infer`` goes to a (Ray) ``BatchingInferenceServer``; its ``version`` follows the replies."""

    def __init__(
        self,
        server: object,
        action_horizon: int,
        action_dim: int,
        version: str,
        supports_inpainting: bool = False,
    ) -> None:
        self.server = server
        self.action_horizon = action_horizon
        self.action_dim = action_dim
        self.version = version
        self.supports_inpainting = supports_inpainting

    def infer(self, batch: ObservationBatch, inpainting: InpaintingTargets | None = None) -> ActionChunk:
        """Send the batch (and RTC targets, if any) to the server and wait for the chunk."""
        import ray

        started = time.perf_counter()
        served: ServedChunk = ray.get(self.server.infer.remote(batch, inpainting))
        self.version = served.version
        served.chunk.timing["infer_ms"] = (time.perf_counter() - started) * 1e3
        return served.chunk

    def reset(self) -> None:
        """Stateless on the worker side."""


def _concat_batches(batches: list[ObservationBatch]) -> ObservationBatch:
    """Concatenate observation batches along the batch axis."""
    merged = ObservationBatch(
        images={cam: np.concatenate([b["images"][cam] for b in batches]) for cam in batches[0]["images"]},
        state=np.concatenate([b["state"] for b in batches]),
        prompt=[prompt for b in batches for prompt in b["prompt"]],
    )
    if all("privileged" in b for b in batches):
        merged["privileged"] = np.concatenate([b["privileged"] for b in batches])
    return merged


def _split_chunk(chunk: ActionChunk, requests: list[_Request]) -> list[ActionChunk]:
    """Split a merged chunk back into one per request, in order."""
    parts, start = [], 0
    for request in requests:
        stop = start + batch_size(request.batch)
        embeddings = None if chunk.embeddings is None else chunk.embeddings[start:stop]
        parts.append(ActionChunk(chunk.actions[start:stop], embeddings, dict(chunk.timing)))
        start = stop
    return parts
