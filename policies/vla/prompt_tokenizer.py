"""Prompt tokenizer: a small BPE (``tokenizers``) trained on the task prompts plus flywheel's condition vocabulary.

Lower-cased, split on whitespace and punctuation; the initial alphabet holds every printable ASCII character, so
an unseen word still tokenizes into known sub-words or characters; anything else maps to ``[UNK]``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID = 0

#: Condition text the learners append to prompts (RECAP advantage indicator, metadata tags, subtasks).
CONDITION_VOCABULARY: tuple[str, ...] = (
    "Advantage: positive",
    "Advantage: negative",
    "quality: high",
    "quality: medium",
    "quality: low",
    "speed: fast",
    "speed: medium",
    "speed: slow",
    "subtask: reach",
    "subtask: grasp",
    "subtask: lift",
    "subtask: move",
    "subtask: place",
    "subtask: push",
    "subtask: pull",
    "subtask: open",
    "subtask: close",
    "subtask: press",
    "subtask: insert",
    "subtask: release",
    "subtask: done",
)


class PromptError(ValueError):
    """A prompt that cannot be tokenized within the model's limits (one line naming the field)."""


def train_prompt_tokenizer(prompts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train the BPE on ``prompts`` plus :data:`CONDITION_VOCABULARY`; id 0 is ``[PAD]``, id 1 ``[UNK]``."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[PAD, UNK],
        initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation),
        show_progress=False,
    )
    corpus = [*prompts, *CONDITION_VOCABULARY]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids per prompt; raises :class:`PromptError` naming the prompt if one exceeds ``max_tokens``."""
    encodings = tokenizer.encode_batch(prompts)
    ids = [encoding.ids for encoding in encodings]
    for index, row in enumerate(ids):
        if len(row) > max_tokens:
            raise PromptError(
                f"prompt[{index}]: {len(row)} tokens, expected at most max_prompt_tokens={max_tokens} "
                f"({prompts[index][:60]!r})"
            )
    return ids, max((len(row) for row in ids), default=0)
