"""What a saved RLT policy deploys with: the prior it refines and the hand-off to its actor.

Every RLT checkpoint's manifest (``rlt.checkpoint.RLTManifest``) carries this as its ``deployment`` block, so
loading never has to know who trained the policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from envs.metaworld_env import HANDOFF_PAIRS, PRIVILEGED_DIM
from envs.scripted import ScriptedPolicy
from policies.base import Policy
from rlt.config import ALWAYS, info_handoff_key
from rlt.phase import AlwaysCritical, InfoKeySwitch, PhaseSwitch, handoff_switch
from rlt.state import EmbeddingPrior, StateProjectionEmbedder

#: Shape of the stand-in "VLA embeddings" of a prior that has none: a fixed projection of the 39-D sim state.
PROJECTED_TOKENS, PROJECTED_WIDTH = 8, 32


def with_projected_embeddings(policy: Policy, seed: int) -> EmbeddingPrior:
    """``policy`` with a fixed random projection of the privileged simulator state as its embeddings."""
    embedder = StateProjectionEmbedder(
        PRIVILEGED_DIM, PROJECTED_TOKENS, PROJECTED_WIDTH, key="privileged", seed=seed
    )
    return EmbeddingPrior(policy, embedder)


@dataclass(frozen=True)
class PriorSpec:
    """The prior an RLT policy acts around: a store version, or a scripted expert with its noise and seed.

    ``projected_embeddings`` marks a stored version that returns no embeddings (a state policy, an openpi
    server sending none): RLT trained on a fixed projection of its privileged state, and deployment rebuilds it.
    ``object_bias`` / ``goal_bias`` (metres, xyz) make a scripted expert systematically wrong about the object's /
    goal's position (``envs.experts.ScriptedExpert``).
    """

    version: str
    scripted_noise: float | None
    seed: int
    projected_embeddings: bool = False
    object_bias: tuple[float, float, float] | None = None
    goal_bias: tuple[float, float, float] | None = None

    def load(self, task: str, chunk_size: int, load_version: Callable[[str], Policy]) -> Policy:
        """The prior: a stored version via ``load_version`` (a VLA, or an earlier RLT policy; wrapped with
        projected embeddings if it was trained that way), or a scripted expert (with its biases) holding its
        action for ``chunk_size`` steps, with projected privileged state as embeddings."""
        if self.scripted_noise is None:
            policy = load_version(self.version)
            return with_projected_embeddings(policy, self.seed) if self.projected_embeddings else policy
        scripted = ScriptedPolicy(
            task,
            noise_std=self.scripted_noise,
            seed=self.seed,
            action_horizon=chunk_size,
            version=self.version,
            object_bias=self.object_bias,
            goal_bias=self.goal_bias,
        )
        return with_projected_embeddings(scripted, self.seed)


@dataclass(frozen=True)
class RLTDeployment:
    """The task, the prior and the hand-off of an RLT policy.

    ``handoff`` is a ``envs.metaworld_env.HANDOFF_PAIRS`` pair (the actor takes over once its distance falls below
    ``handoff_distance``), ``"always"`` (from the first chunk) or ``"info:<key>"`` (once the env info flag
    ``key`` is set; distance 0); build with ``with_handoff``. Manifests
    written before ``with_handoff`` may say a pair with distance ``≤ 0``, which still means the same.
    """

    task: str
    prior: PriorSpec
    handoff: str
    handoff_distance: float

    @classmethod
    def with_handoff(cls, task: str, prior: PriorSpec, pair: str, distance: float) -> RLTDeployment:
        """A distance hand-off on ``pair``; pair ``"always"`` or ``distance ≤ 0`` (RLT from the first chunk) is
        recorded as ``"always"`` with distance 0, the one spelling of that hand-off in a manifest; an
        ``info:<key>`` hand-off is recorded with distance 0 (it has none)."""
        if info_handoff_key(pair) is not None:
            return cls(task, prior, pair, 0.0)
        if pair == ALWAYS or distance <= 0:
            return cls(task, prior, ALWAYS, 0.0)
        return cls(task, prior, pair, distance)

    def switch(self) -> PhaseSwitch:
        """The phase switch that hands off to the actor."""
        key = info_handoff_key(self.handoff)
        if key is not None:
            return InfoKeySwitch(key)
        if self.handoff == ALWAYS:
            return AlwaysCritical()
        return handoff_switch(HANDOFF_PAIRS, self.handoff, self.handoff_distance)
