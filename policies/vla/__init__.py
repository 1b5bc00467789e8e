"""The built-in π0-style VLA: config, network, prompt tokenizer and the ``Policy`` wrapper."""

from policies.vla.config import SIZES, ConfigError, VLAConfig
from policies.vla.model import GuidanceFn, PrefixOutput, VLAModel, make_attention_mask, sample_tau
from policies.vla.policy import ModelInputs, VLAInputError, VLAPolicy
from policies.vla.prompt_tokenizer import CONDITION_VOCABULARY, PromptError, train_prompt_tokenizer

__all__ = [
    "CONDITION_VOCABULARY",
    "SIZES",
    "ConfigError",
    "GuidanceFn",
    "ModelInputs",
    "PrefixOutput",
    "PromptError",
    "VLAConfig",
    "VLAInputError",
    "VLAModel",
    "VLAPolicy",
    "make_attention_mask",
    "sample_tau",
    "train_prompt_tokenizer",
]
