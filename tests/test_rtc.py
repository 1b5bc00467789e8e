"""Real-Time Chunking: the soft mask, ΠGDM guidance on the built-in VLA, and the three execution modes end to end."""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import pytest
import torch

from actors.execution import ChunkSchedule, ExecutionConfig, ExecutionConfigError
from actors.rollout import RolloutWorker
from envs import EnvConfig, make_env
from envs.scripted import ScriptedPolicy
from policies.rtc import (
    InpaintingTargets,
    RTCConfigError,
    guidance_scale,
    inpainting_guidance,
    rtc_weights,
    supports_inpainting,
)
from policies.training import EpisodeArrays, build_dataset, create_policy
from policies.vla import VLAConfig, VLAPolicy
from storage import EpisodeRecord, StepSource

IMAGE = 48
HORIZON = 10
ENV = EnvConfig(task="reach-v3", cameras=("corner2",), width=IMAGE, height=IMAGE, max_episode_steps=40)


def tiny_vla(seed: int = 0) -> VLAPolicy:
    """An untrained tiny VLA for ``ENV`` observations, its statistics fitted on random data of the right shapes."""
    rng = np.random.default_rng(seed)
    steps = 32
    episode = EpisodeArrays(
        images={"corner2": rng.integers(0, 256, size=(steps, IMAGE, IMAGE, 3), dtype=np.uint8)},
        state=rng.normal(size=(steps, 7)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(steps, 4)).astype(np.float32),
        prompt=ENV.instruction,
    )
    config = VLAConfig.preset(
        "tiny", image_size=IMAGE, cameras=("corner2",), state_dim=7, action_dim=4, action_horizon=HORIZON
    )
    return create_policy(config, build_dataset([episode], horizon=HORIZON), seed=seed)


@pytest.fixture(scope="module")
def vla() -> VLAPolicy:
    return tiny_vla()


def _batch(size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": {"corner2": rng.integers(0, 256, size=(size, IMAGE, IMAGE, 3), dtype=np.uint8)},
        "state": rng.normal(size=(size, 7)).astype(np.float32),
        "prompt": [ENV.instruction] * size,
    }


@pytest.mark.parametrize(("horizon", "delay", "steps"), [(10, 2, 5), (16, 4, 8), (8, 0, 8), (12, 3, 3)])
def test_rtc_weights_match_the_formula(horizon, delay, steps):
    weights = rtc_weights(horizon, delay, steps)
    for i, w in enumerate(weights):
        if i < delay:
            expected = 1.0
        elif i < horizon - steps:
            c = (horizon - steps - i) / (horizon - steps - delay + 1)
            expected = c * (math.exp(c) - 1) / (math.e - 1)
        else:
            expected = 0.0
        assert w == pytest.approx(expected, abs=1e-6), i
    assert np.all(np.diff(weights) <= 1e-7), "the mask decays along the chunk"
    overlap = weights[: horizon - steps]
    assert np.all((overlap > 0) & (overlap <= 1))


def test_rtc_parameters_that_do_not_fit_are_rejected_by_name():
    with pytest.raises(RTCConfigError, match="execute_horizon"):
        rtc_weights(10, 4, 7)
    with pytest.raises(ExecutionConfigError, match="execute_horizon"):
        ExecutionConfig(mode="rtc", delay=4, execute_horizon=8).steps(10)
    with pytest.raises(ExecutionConfigError, match="delay"):
        ExecutionConfig(mode="naive_async", delay=4, execute_horizon=3).steps(10)
    with pytest.raises(ExecutionConfigError, match="execute_horizon"):
        too_long = ExecutionConfig(mode="rtc", delay=3, execute_horizon=3)
        RolloutWorker(
            [make_env], ScriptedPolicy(action_horizon=4), print, task="reach-v3", execution=too_long
        )
    assert ExecutionConfig(mode="sync", delay=3).steps(10) == 10
    assert ExecutionConfig(mode="rtc", delay=3).steps(10) == 7


def test_guidance_scale_is_clipped_and_vanishes_at_data():
    assert guidance_scale(0.0, 5.0) == 5.0
    assert guidance_scale(1.0, 5.0) == 0.0
    tau = 0.5  # r² = 0.5 → (1 − τ) / (τ r²) = 2
    assert guidance_scale(tau, 5.0) == pytest.approx(2.0)
    assert guidance_scale(tau, 1.0) == 1.0


def test_zero_weights_sample_exactly_as_without_guidance(vla):
    batch, noise = _batch(3, 0), np.random.default_rng(1).normal(size=(3, HORIZON, 4)).astype(np.float32)
    plain = vla.infer(batch, noise=noise).actions
    zero = inpainting_guidance(torch.zeros(3, HORIZON, 4), torch.zeros(3, HORIZON))
    guided = vla.infer(batch, noise=noise, guidance=zero).actions
    np.testing.assert_allclose(guided, plain, atol=1e-5)


def test_inpainting_keeps_the_committed_prefix_and_smooths_the_switch(vla):
    size, delay, steps = 16, 3, 4
    previous = vla.infer(_batch(size, 10)).actions  # the chunks being executed
    batch = _batch(size, 11)  # the observations when the next chunks are requested
    noise = np.random.default_rng(12).normal(size=(size, HORIZON, 4)).astype(np.float32)
    weights = np.tile(rtc_weights(HORIZON, delay, steps), (size, 1))
    index = np.minimum(np.arange(HORIZON) + steps, HORIZON - 1)
    targets = InpaintingTargets(previous[:, index], weights, beta=5.0)

    naive = vla.infer(batch, noise=noise).actions
    inpainted = vla.infer(batch, noise=noise, guidance=_guidance(vla, targets)).actions
    committed = previous[:, steps : steps + delay]
    span = np.ptp(previous)
    prefix_error = np.abs(inpainted[:, :delay] - committed).max()
    assert prefix_error < 0.05 * span, f"committed prefix drifted by {prefix_error:.3f} (span {span:.2f})"
    assert prefix_error < 0.2 * np.abs(naive[:, :delay] - committed).max()
    # the robot executes previous[steps + delay − 1], then the new chunk at index delay
    last = previous[:, steps + delay - 1]
    jump_rtc = np.abs(inpainted[:, delay] - last).max()
    jump_naive = np.abs(naive[:, delay] - last).max()
    assert jump_rtc < jump_naive, (jump_rtc, jump_naive)


def _guidance(policy: VLAPolicy, targets: InpaintingTargets):
    normalized = policy.normalize_actions(targets.actions)
    return inpainting_guidance(normalized, torch.from_numpy(targets.weights), targets.beta)


def test_schedule_timing_per_mode():
    """Request times, waiting steps and executed offsets for H=6, d=2, s=3 over 9 steps."""

    def run(mode: str, delay: int = 2, steps: int = 3) -> list[tuple[int, int]]:
        execution = ExecutionConfig(mode=mode, delay=delay, execute_horizon=steps)
        schedule = ChunkSchedule(execution, horizon=6, action_dim=4)
        trace, chunks = [], 0
        for _ in range(11):
            if schedule.needs_chunk():
                schedule.receive(np.full((6, 4), chunks, np.float32), chunks, "v", 1.0)
                chunks += 1
            scheduled = schedule.next_action()
            trace.append((scheduled.chunk_id, scheduled.offset))
        return trace

    wait = (-1, -1)
    assert run("sync") == [wait, wait, (0, 0), (0, 1), (0, 2), wait, wait, (1, 0), (1, 1), (1, 2), wait]
    # async: the first chunk has nothing to continue; later chunks run at offsets d..s+d−1
    expected = [wait, wait, (0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4)]
    assert run("naive_async") == expected == run("rtc")
    # d = s: the next request goes out as soon as a chunk arrives, so the robot never waits again
    d_equals_s = [wait, wait, (0, 0), (0, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 2), (3, 3), (4, 2)]
    assert run("naive_async", delay=2, steps=2) == d_equals_s



def test_schedule_in_real_time_as_the_robot_runtime_drives_it():
    """A chunk handed over with ``arrived_after=k`` runs at once from action k; the next request is due ``lead``
    steps before the execute horizon s; a late reply is bridged by the chunk's remaining actions, then a hold
    that keeps the gripper. In sync mode the chunk stops at s."""
    gripper = np.array([0.0, 0.0, 0.0, 0.7], np.float32)
    schedule = ChunkSchedule(ExecutionConfig(mode="naive_async", execute_horizon=4), horizon=None, action_dim=4)
    assert schedule.needs_chunk(lead=2)
    first = schedule.next_action(hold_from=gripper)
    assert (first.chunk_id, first.offset, first.action[3]) == (-1, -1, np.float32(0.7))
    schedule.receive(np.ones((6, 4), np.float32), 0, "v1", 5.0, arrived_after=1)
    trace = []
    for _ in range(6):
        due = schedule.needs_chunk(lead=2)
        scheduled = schedule.next_action(hold_from=gripper)
        trace.append((due, scheduled.chunk_id, scheduled.offset, scheduled.starts_chunk))
    assert trace == [
        (False, 0, 1, True),
        (True, 0, 2, False),  # index 2 = s − lead: the request goes out; the reply is late
        (True, 0, 3, False),
        (True, 0, 4, False),  # past s: the chunk's remaining actions bridge the wait
        (True, 0, 5, False),
        (True, -1, -1, False),  # nothing left: hold
    ]
    schedule.receive(np.full((6, 4), 2.0, np.float32), 1, "v2", 5.0, arrived_after=9)
    late = schedule.next_action()
    assert (late.chunk_id, late.offset, late.version, late.latency_ms) == (1, 5, "v2", 5.0)

    sync = ChunkSchedule(ExecutionConfig(mode="sync", execute_horizon=4), horizon=None, action_dim=4)
    sync.receive(np.ones((6, 4), np.float32), 0, "v1", 5.0, arrived_after=0)
    offsets = [sync.next_action().offset for _ in range(5)]
    assert offsets == [0, 1, 2, 3, -1] and sync.needs_chunk()

def _collect(policy, execution: ExecutionConfig, episodes: int = 2) -> list[EpisodeRecord]:
    records: list[EpisodeRecord] = []
    factory = functools.partial(make_env, ENV)
    worker = RolloutWorker(
        [factory] * 2, policy, records.append, task=ENV.task, seed=5, execution=execution, record_images=False
    )
    worker.run(episodes=episodes)
    worker.close()
    return records


def _assert_provenance(record: EpisodeRecord, execution: ExecutionConfig) -> None:
    from_chunk = record.chunk_ids >= 0
    waiting = (record.chunk_ids < 0) & (record.sources == StepSource.POLICY)
    np.testing.assert_allclose(
        record.actions[from_chunk],
        record.chunks[record.chunk_ids, record.chunk_offsets][from_chunk],
        atol=1e-6,
    )
    assert np.all(record.actions[waiting, :3] == 0.0), "waiting steps hold still"
    assert waiting[: execution.delay].all() and record.metadata["inference_delay"] == execution.delay
    assert len(record.chunks) > 2


def test_sync_mode_waits_delay_steps_for_every_chunk():
    execution = ExecutionConfig(mode="sync", delay=2, execute_horizon=3)
    for record in _collect(ScriptedPolicy("reach-v3", action_horizon=5, version="expert"), execution):
        _assert_provenance(record, execution)
        assert record.metadata["execution_mode"] == "sync"
        assert set(record.chunk_offsets[record.chunk_ids >= 0]) <= {0, 1, 2}
        waiting = int(((record.chunk_ids < 0) & (record.sources == StepSource.POLICY)).sum())
        started = len(np.unique(record.chunk_ids[record.chunk_ids >= 0]))
        assert waiting >= 2 * started and waiting <= 2 * len(record.chunks)


def test_rtc_without_guidance_support_falls_back_to_naive_async(caplog):
    policy = ScriptedPolicy("reach-v3", action_horizon=6, version="expert")
    assert not supports_inpainting(policy)
    execution = ExecutionConfig(mode="rtc", delay=2, execute_horizon=3)
    with caplog.at_level(logging.WARNING, logger="actors.rollout"):
        records = _collect(policy, execution)
    assert "falls back to naive async" in caplog.text
    for record in records:
        _assert_provenance(record, execution)
        assert record.metadata["execution_mode"] == "naive_async"
        later = record.chunk_ids > 0
        assert set(record.chunk_offsets[later & (record.chunk_ids >= 0)]) <= {2, 3, 4}


def test_rtc_mode_with_the_vla_continues_the_committed_actions(vla):
    delay, steps = 2, 4
    assert supports_inpainting(vla)
    execution = ExecutionConfig(mode="rtc", delay=delay, execute_horizon=steps)
    records = _collect(vla, execution, episodes=2)
    assert len(records) == 2
    for record in records:
        _assert_provenance(record, execution)
        assert record.metadata["execution_mode"] == "rtc"
        span = np.ptp(record.chunks)
        # each chunk's committed prefix continues the chunk that was executing when it was requested
        for k in range(2, len(record.chunks)):
            committed = record.chunks[k - 1, steps : steps + delay]
            assert np.abs(record.chunks[k, :delay] - committed).max() < 0.05 * span


def test_served_policy_forwards_inpainting_through_the_batching_server(vla):
    """RTC targets travel with each request; the server merges them into one guided batch."""
    import asyncio

    from actors.inference import BatchingInferenceServer

    server = BatchingInferenceServer(vla, max_batch=8, max_wait_ms=20.0)
    previous = vla.infer(_batch(4, 20)).actions
    weights = np.tile(rtc_weights(HORIZON, 2, 4), (2, 1))
    index = np.minimum(np.arange(HORIZON) + 4, HORIZON - 1)

    async def two_workers():
        first = InpaintingTargets(previous[:2, index], weights)
        second = InpaintingTargets(previous[2:, index], np.zeros_like(weights))
        return await asyncio.gather(server.infer(_batch(2, 21), first), server.infer(_batch(2, 22), second))

    guided, plain = asyncio.run(two_workers())
    assert server.batch_sizes == [4]
    span = np.ptp(previous)
    assert np.abs(guided.chunk.actions[:, :2] - previous[:2, 4:6]).max() < 0.05 * span
    assert np.abs(plain.chunk.actions[:, :2] - previous[2:, 4:6]).max() > 0.05 * span
