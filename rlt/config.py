"""RLT's settings, each declared once: the learner's, the online loop's and a whole RLT run's.

``LearnerConfig`` (the chunked actor-critic, ``rlt.td3``), ``OnlineSettings`` (the online loop's budget,
exploration and evaluation, ``rlt.online``; ``OnlineConfig`` adds what names one run) and ``RLTConfig`` (both plus
the hand-off and the RL token's width) are pydantic models: the pipeline config embeds ``RLTConfig`` as its ``rlt``
block, ``flywheel rlt`` reads the same block (``--config``, ``--set``, typed flags) and the benchmarks build them
with keyword overrides. Defaults live here only. Invalid values raise ``pydantic.ValidationError`` whose first
error names the field (``experiments.validation.first_error`` makes it one line).

This module imports only pydantic, so the CLI can read field defaults and descriptions for its ``--help``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

#: The hand-off from the first chunk; the others are ``envs.metaworld_env.HANDOFF_PAIRS`` distance pairs and
#: env info flags (``INFO_HANDOFF``).
ALWAYS = "always"
#: The prefix of a hand-off on an env info entry, ``info:<key>`` (``rlt.phase.InfoKeySwitch``), e.g.
#: ``info:grasp_success``; the key is one of ``envs.metaworld_env.HANDOFF_INFO_KEYS``.
INFO_HANDOFF = "info:"


def info_handoff_key(handoff: str) -> str | None:
    """The env info key of an ``info:<key>`` hand-off; None for any other hand-off."""
    return handoff.removeprefix(INFO_HANDOFF) if handoff.startswith(INFO_HANDOFF) else None


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LearnerConfig(_Settings):
    """Hyper-parameters of the chunked actor-critic (``rlt.td3.ChunkedTD3``; defaults follow the RLT recipe).

    The actor loss is ``−w · Q(x, π(x, ã_drop)) + β · ‖π − ã‖²`` (``q_weight`` w, ``beta`` β); ``q_weight`` 0
    leaves only the regression toward ``ã`` with reference dropout: the ablation that shows whether the critic
    contributes anything. ``residual_scale`` s (off by default) makes the policy ``clip(ã + s · π(x, ã))`` with
    the actor's last layer zero-initialised, so it starts exactly at the prior's chunk. ``normalize_state``
    standardizes ``x`` per entry with the replay buffer's statistics at the first gradient step (the warm-up
    data), frozen from then on. The issue-19 options (ensemble, n-step, stride, warm-up and ramp, β reduction,
    human mask, second replay, bootstrapping truncated episodes) keep the earlier learner by default;
    docs/rlt.md has the evidence.
    """

    chunk_size: int = Field(10, ge=1, description="action chunk length C")
    gamma: float = Field(0.99, gt=0.0, le=1.0, description="discount per env step")
    beta: float = Field(1.0, ge=0.0, description="weight β of ‖a − ã‖² in the actor loss")
    ref_dropout: float = Field(
        0.5, ge=0.0, lt=1.0, description="share of the batch whose reference ã is zeroed in the actor input"
    )
    utd_ratio: int = Field(5, ge=1, description="critic updates per chunk transition collected")
    policy_delay: int = Field(2, ge=1, description="critic updates per actor update")
    net_arch: tuple[PositiveInt, ...] = Field(
        (256, 256), min_length=1, description="hidden layer widths of actor and critics"
    )
    learning_rate: float = Field(3e-4, gt=0.0, description="Adam learning rate")
    batch_size: int = Field(256, ge=1, description="replay batch size")
    buffer_size: int = Field(200_000, ge=1, description="replay capacity in chunk transitions")
    learning_starts: int = Field(
        256, ge=1, description="chunk transitions in replay before the first update (RLT acts after it)"
    )
    tau: float = Field(0.005, gt=0.0, le=1.0, description="Polyak rate of the target networks")
    target_policy_noise: float = Field(0.2, ge=0.0, description="target smoothing noise σ")
    target_noise_clip: float = Field(0.5, ge=0.0, description="target smoothing clip c")
    residual_scale: float | None = Field(
        None, gt=0.0, description="residual mode: the policy is clip(ã + s·π(x, ã)); null: π is the chunk"
    )
    actor_q: Literal["q1", "min", "mean"] = Field(
        "q1", description="critic value the actor climbs: Q1 (TD3's), the min or the mean of the members"
    )
    normalize_state: bool = Field(True, description="standardize x with the warm-up data's statistics")
    q_weight: float = Field(1.0, ge=0.0, description="weight w of −Q in the actor loss (0: regression arm)")
    target_noise_space: Literal["residual", "action"] = Field(
        "residual",
        description="target smoothing on the residual network's output (s·σ in action units) or on the chunk",
    )
    n_critics: int = Field(2, ge=2, description="critic ensemble members")
    critic_layer_norm: bool = Field(False, description="LayerNorm after each critic hidden layer")
    target_critics: int = Field(2, ge=1, description="members drawn per update for the TD target's min")
    n_step: int = Field(1, ge=1, description="executed chunks until the bootstrap")
    stride: int | None = Field(
        None, ge=1, description="steps between transition starts (divides C; null: C, one per chunk)"
    )
    critic_warmup_updates: int = Field(0, ge=0, description="critic-only updates before the actor's first")
    q_weight_start: float | None = Field(
        None, ge=0.0, description="q_weight at the ramp's start (null: constant q_weight)"
    )
    beta_end: float | None = Field(None, ge=0.0, description="β at the ramp's end (null: constant beta)")
    ramp_updates: int = Field(0, ge=0, description="updates over which q_weight and β ramp (0: no ramp)")
    beta_reduction: Literal["sum", "mean"] = Field(
        "sum", description="β's norm: sum or mean over C×D entries"
    )
    beta_on: Literal["chunk", "residual"] = Field(
        "chunk", description="β on ‖a − ã‖ (chunk) or on the residual network's output (residual mode)"
    )
    human_mask: Literal["chunk", "step"] = Field(
        "chunk", description="a human step replaces the whole chunk's reference, or only its own row"
    )
    bootstrap_truncated: bool = Field(
        False,
        description="bootstrap a time-limit-cut episode's last transitions from its final observation "
        "(EpisodeRecord.final_observation; else they are dropped)",
    )
    demo_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of each batch from the second replay (demos, interventions)"
    )
    seed: int = Field(0, ge=0, description="random seed (a run's seed overrides it)")
    device: str = Field("auto", description="where it trains: cpu, cuda, mps or auto")

    @model_validator(mode="after")
    def _consistent(self) -> LearnerConfig:
        if self.target_critics > self.n_critics:
            raise ValueError(
                f"target_critics: expected ≤ n_critics ({self.n_critics}), got {self.target_critics}"
            )
        if self.stride is not None and self.chunk_size % self.stride:
            raise ValueError(f"stride: expected a divisor of chunk_size {self.chunk_size}, got {self.stride}")
        if self.beta_on == "residual" and self.residual_scale is None:
            raise ValueError("beta_on: 'residual' needs residual_scale (residual mode)")
        return self

    @property
    def transition_stride(self) -> int:
        """Steps between consecutive transition starts (``C`` unless ``stride`` is set)."""
        return self.stride or self.chunk_size

    def loss_weights(self, update: int) -> tuple[float, float]:
        """``(q_weight, β)`` of the actor loss at gradient step ``update`` (1-based), per the warm-up/ramp."""
        if self.ramp_updates == 0:
            progress = 1.0
        else:
            progress = min(max((update - self.critic_warmup_updates) / self.ramp_updates, 0.0), 1.0)
        q_start = self.q_weight if self.q_weight_start is None else self.q_weight_start
        beta_end = self.beta if self.beta_end is None else self.beta_end
        return (
            q_start + progress * (self.q_weight - q_start),
            self.beta + progress * (beta_end - self.beta),
        )


class OnlineSettings(_Settings):
    """Budget, exploration and evaluation of an online run (``rlt.online.OnlineRLT``).

    ``total_env_steps`` is the online budget after warm-up; evaluation episodes (on seeds ``eval_seed_base + i``,
    the same for every run) are not counted as training steps. ``exploration`` ``"iid"`` adds Gaussian noise per
    chunk entry (it averages out inside a chunk); ``"offset"`` holds one Gaussian offset per action dimension for
    the whole chunk, correlated across an episode's chunks as an AR(1) process with coefficient
    ``exploration_rho``, so exploration can try a consistent correction.
    """

    warmup_episodes: int = Field(20, ge=0, description="fresh prior-only episodes before learning")
    total_env_steps: int = Field(20_000, ge=0, description="online env-step budget after warm-up")
    exploration_noise: float = Field(0.2, ge=0.0, description="exploration noise σ")
    exploration: Literal["iid", "offset"] = Field(
        "iid", description="noise per chunk entry, or one offset per chunk correlated across chunks"
    )
    exploration_rho: float = Field(0.0, ge=0.0, lt=1.0, description="AR(1) coefficient of offset exploration")
    state_key: Literal["state", "privileged"] = Field(
        "state", description="observation vector that is the proprio part of x"
    )
    token_steps: int = Field(2000, ge=1, description="gradient steps fitting the RL token")
    token_batch_size: int = Field(128, ge=1, description="batch size fitting the RL token")
    eval_every_steps: int = Field(
        0, ge=0, description="env steps between evaluations of the learner (the RL curve; 0: none)"
    )
    eval_episodes: int = Field(20, ge=1, description="episodes per evaluation")
    eval_seed_base: int = Field(500_000, ge=0, description="first evaluation episode's seed")
    record_images: bool = Field(False, description="record camera images in the stored episodes")


class OnlineConfig(OnlineSettings):
    """``OnlineSettings`` plus what names one run: its task, the RL version and the seed."""

    task: str
    rl_version: str = "rlt"
    seed: int = Field(0, ge=0)


class RLTConfig(_Settings):
    """One RLT run's settings: the hand-off, the RL token's width, the online loop's and the learner's.

    The pipeline config's ``rlt`` block and ``flywheel rlt --config`` are this model. ``handoff`` picks the
    critical phase where RLT takes over: ``always`` (from the first chunk), the distance between two
    privileged-state points falling under ``handoff_distance``, or ``info:<key>``: the first chunk start whose
    env info has ``key`` set (``rlt.phase.InfoKeySwitch``; ``handoff_distance`` is then unused). A scripted prior gets fixed random-projection
    embeddings of the privileged state (``rlt.state.EmbeddingPrior``); a VLA prior's own embeddings feed the
    RL token (``z_dim`` wide).
    """

    handoff: str = Field(
        "hand-object",
        description="where RLT takes over: always, a distance pair (hand-object, object-goal, …) or "
        "info:<key>, an env info flag (info:grasp_success, info:near_object)",
    )
    handoff_distance: float = Field(
        0.05, gt=0.0, description="hand off once the pair's distance is below this"
    )
    z_dim: int = Field(32, ge=1, description="width of the RL token bottleneck z_rl")
    token_normalization: Literal["channel", "position"] = Field(
        "channel", description="RL token input statistics per channel, or per position and channel"
    )
    online: OnlineSettings = OnlineSettings()
    learner: LearnerConfig = LearnerConfig()

    @field_validator("handoff")
    @classmethod
    def _known_handoff(cls, handoff: str) -> str:
        # here, so that reading defaults imports no simulator
        from envs.metaworld_env import HANDOFF_INFO_KEYS, HANDOFF_PAIRS

        if handoff == ALWAYS or handoff in HANDOFF_PAIRS or info_handoff_key(handoff) in HANDOFF_INFO_KEYS:
            return handoff
        raise ValueError(
            f"expected {ALWAYS!r} or a pair of {sorted(HANDOFF_PAIRS)}, or {INFO_HANDOFF}<key> with a key of "
            f"{list(HANDOFF_INFO_KEYS)}, got {handoff!r}"
        )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """Settings written flat (the layout before ``online``/``learner``) are named with their new place."""
        if isinstance(data, dict):
            for key in data:
                for block, model in (("online", OnlineSettings), ("learner", LearnerConfig)):
                    if key in model.model_fields or (block, key) == ("online", "env_steps"):
                        new = "total_env_steps" if key == "env_steps" else key
                        raise ValueError(f"{key}: moved to {block}.{new}")
        return data
