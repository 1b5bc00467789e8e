"""flywheel RECAP learner core: rewards → distributional value → cross-fitted relabel → conditioning.

Pure torch/numpy over ``EpisodeRecord``s; runs without Ray. See docs/recap.md.
"""

from core.types import monte_carlo_returns
from recap.advantage import monte_carlo_advantages, n_step_advantages, quantile_threshold
from recap.bins import ReturnBins
from recap.conditioning import (
    NEGATIVE_PROMPT,
    POSITIVE_PROMPT,
    ConditionedEpisode,
    RelabelMismatchError,
    advantage_prompt,
    conditioned_episodes,
)
from recap.config import AdvantageConfig, RelabelConfig, RewardConfig, SanityFloor, ValueConfig
from recap.encoders import register_encoder
from recap.relabel import CrossFitResult, assign_folds, cross_fit, relabel, relabel_with_model
from recap.rewards import RecapInputError, step_rewards
from recap.selectors import (
    AWRConfig,
    advantage_filtered_weights,
    awr_weights,
    bc_all_weights,
    filtered_bc_weights,
)
from recap.value import ValueModel, train_value

__all__ = [
    "NEGATIVE_PROMPT",
    "POSITIVE_PROMPT",
    "AWRConfig",
    "AdvantageConfig",
    "ConditionedEpisode",
    "CrossFitResult",
    "RecapInputError",
    "RelabelConfig",
    "RelabelMismatchError",
    "ReturnBins",
    "RewardConfig",
    "SanityFloor",
    "ValueConfig",
    "ValueModel",
    "advantage_filtered_weights",
    "advantage_prompt",
    "assign_folds",
    "awr_weights",
    "bc_all_weights",
    "conditioned_episodes",
    "cross_fit",
    "filtered_bc_weights",
    "monte_carlo_advantages",
    "monte_carlo_returns",
    "n_step_advantages",
    "quantile_threshold",
    "register_encoder",
    "relabel",
    "relabel_with_model",
    "step_rewards",
    "train_value",
]
