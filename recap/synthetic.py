"""Synthetic chain episodes for tests, docs and benchmarks of the RECAP learner (no simulator needed).

An agent walks a chain of ``goal`` cells; each step it moves forward with probability ``p_forward`` (else
back, never below 0). Reaching the end is success; running out of ``max_steps`` is a time-limit failure. A
simulated human may take over for a segment and always moves forward. The state is (position / goal,
``p_forward``-dependent "skill" cue, noise), so a value model can tell good from bad situations; forward steps
are the good actions.
"""

from __future__ import annotations

import uuid

import numpy as np

from storage.records import EpisodeRecord, InterventionSegment, Outcome, StepSource


def make_episode(
    task: str,
    states: np.ndarray,
    actions: np.ndarray,
    outcome: Outcome,
    sources: np.ndarray | None = None,
    interventions: list[InterventionSegment] | None = None,
    privileged: np.ndarray | None = None,
    images: dict[str, np.ndarray] | None = None,
    episode_uuid: uuid.UUID | None = None,
) -> EpisodeRecord:
    """A validated ``EpisodeRecord`` from the arrays a learner reads; the rest is filled consistently."""
    length = int(actions.shape[0])
    terminated = np.zeros(length, dtype=bool)
    truncated = np.zeros(length, dtype=bool)
    rewards = np.zeros(length, dtype=np.float32)
    if outcome == Outcome.SUCCESS:
        terminated[-1] = True
        rewards[-1] = 1.0
    else:
        truncated[-1] = True
    record = EpisodeRecord(
        uuid=episode_uuid or uuid.uuid4(),
        task=task,
        env_id=f"synthetic/{task}",
        policy_version="synthetic",
        seed=None,
        outcome=outcome,
        states=np.asarray(states, dtype=np.float32),
        actions=np.asarray(actions, dtype=np.float32),
        rewards=rewards,
        terminated=terminated,
        truncated=truncated,
        sources=np.zeros(length, dtype=np.uint8) if sources is None else np.asarray(sources, dtype=np.uint8),
        policy_versions=["synthetic"] * length,
        chunk_ids=np.full(length, -1, dtype=np.int32),
        chunk_offsets=np.zeros(length, dtype=np.int32),
        latency_ms=np.zeros(length, dtype=np.float32),
        chunks=np.zeros((0, 1, actions.shape[1]), dtype=np.float32),
        images=images or {},
        privileged=None if privileged is None else np.asarray(privileged, dtype=np.float32),
        interventions=interventions or [],
    )
    record.validate()
    return record


def chain_episode(
    rng: np.random.Generator,
    task: str = "chain",
    goal: int = 20,
    max_steps: int = 60,
    p_forward: float = 0.7,
    intervention_rate: float = 0.0,
    intervention_length: int = 5,
    noise_dims: int = 2,
) -> EpisodeRecord:
    """Roll out one chain episode; ``intervention_rate`` is the per-step chance of a human takeover."""
    position = 0
    states: list[np.ndarray] = []
    actions: list[float] = []
    sources: list[int] = []
    segments: list[InterventionSegment] = []
    human_left = 0
    outcome = Outcome.TRUNCATED
    for step in range(max_steps):
        noise = rng.normal(size=noise_dims)
        states.append(np.concatenate([[position / goal, p_forward], noise]).astype(np.float32))
        if human_left == 0 and rng.random() < intervention_rate:
            human_left = min(intervention_length, max_steps - step)
            segments.append(InterventionSegment(step, step + human_left, "synthetic"))
        human = human_left > 0
        human_left = max(0, human_left - 1)
        forward = human or rng.random() < p_forward
        actions.append(1.0 if forward else -1.0)
        sources.append(int(StepSource.HUMAN if human else StepSource.POLICY))
        position = max(0, position + (1 if forward else -1))
        if position >= goal:
            outcome = Outcome.SUCCESS
            break
    length = len(actions)
    segments = [InterventionSegment(s.t_start, min(s.t_end, length), s.trigger) for s in segments]
    return make_episode(
        task,
        np.stack(states),
        np.array(actions, dtype=np.float32)[:, None],
        outcome,
        sources=np.array(sources),
        interventions=segments,
    )


def chain_dataset(
    seed: int,
    episodes_per_task: int = 40,
    tasks: tuple[str, ...] = ("chain-a", "chain-b"),
    p_forward_range: tuple[float, float] = (0.5, 0.9),
    intervention_rate: float = 0.0,
    goal: int = 20,
    max_steps: int = 60,
) -> list[EpisodeRecord]:
    """Chain episodes for several tasks, each with ``p_forward`` drawn uniformly from ``p_forward_range``."""
    rng = np.random.default_rng(seed)
    return [
        chain_episode(
            rng,
            task=task,
            goal=goal,
            max_steps=max_steps,
            p_forward=float(rng.uniform(*p_forward_range)),
            intervention_rate=intervention_rate,
        )
        for task in tasks
        for _ in range(episodes_per_task)
    ]
