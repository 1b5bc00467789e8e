"""FAST action tokenizer: round trip, compression vs naive binning, graceful decoding, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from policies.fast import FASTError, FASTTokenizer, naive_bin_detokenize, naive_bin_tokenize


def smooth_chunks(count: int = 600, horizon: int = 10, dim: int = 4, seed: int = 0) -> np.ndarray:
    """Smooth random trajectories (random sinusoids plus offsets), ``count×horizon×dim``."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, horizon)[None, :, None]
    frequency = rng.uniform(0.1, 0.8, size=(count, 1, dim))
    phase = rng.uniform(0.0, 2 * np.pi, size=(count, 1, dim))
    amplitude = rng.uniform(0.2, 1.0, size=(count, 1, dim))
    offset = rng.uniform(-0.3, 0.3, size=(count, 1, dim))
    return (amplitude * np.sin(2 * np.pi * frequency * t + phase) + offset).astype(np.float32)


@pytest.fixture(scope="module")
def fitted() -> tuple[FASTTokenizer, np.ndarray]:
    chunks = smooth_chunks()
    return FASTTokenizer.fit(chunks[:500], vocab_size=512), chunks[500:]


def test_round_trip_error_is_small_and_valid(fitted) -> None:
    tokenizer, held_out = fitted
    decoded = tokenizer.decode(tokenizer.encode(held_out))
    assert decoded.actions.shape == held_out.shape and decoded.valid.all()
    span = tokenizer.q99 - tokenizer.q01
    assert np.abs(decoded.actions - held_out).mean() < 0.02 * span.mean()


def test_compresses_below_naive_binning(fitted) -> None:
    tokenizer, held_out = fitted
    fast_tokens = np.mean([len(ids) for ids in tokenizer.encode(held_out)])
    naive_tokens = naive_bin_tokenize(held_out, tokenizer.q01, tokenizer.q99)[0].size
    assert naive_tokens == 40
    assert fast_tokens < 0.5 * naive_tokens, fast_tokens


def test_naive_binning_round_trip_is_within_one_bin(fitted) -> None:
    tokenizer, held_out = fitted
    inside = np.clip(held_out, tokenizer.q01, tokenizer.q99)
    restored = naive_bin_detokenize(
        naive_bin_tokenize(inside, tokenizer.q01, tokenizer.q99), tokenizer.q01, tokenizer.q99
    )
    assert np.abs(restored - inside).max() <= (tokenizer.q99 - tokenizer.q01).max() / 256 + 1e-6


def test_invalid_token_sequences_decode_gracefully(fitted) -> None:
    tokenizer, held_out = fitted
    good = tokenizer.encode(held_out[:1])[0]
    sequences = [[], good[:2], [*good, *good], [-5, tokenizer.vocab_size + 7], good]
    decoded = tokenizer.decode(sequences)
    assert decoded.actions.shape == (5, 10, 4) and np.isfinite(decoded.actions).all()
    assert decoded.valid.tolist() == [False, False, False, False, True]


def test_save_load_encodes_identically(fitted, tmp_path) -> None:
    tokenizer, held_out = fitted
    tokenizer.save(tmp_path / "fast.json")
    loaded = FASTTokenizer.load(tmp_path / "fast.json")
    assert loaded.encode(held_out) == tokenizer.encode(held_out)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(FASTError, match="cannot read FAST tokenizer"):
        FASTTokenizer.load(tmp_path / "broken.json")


def test_wrong_chunk_shape_raises_naming_expected(fitted) -> None:
    tokenizer, _ = fitted
    with pytest.raises(FASTError, match=r"chunks: expected shape \(N, 10, 4\)"):
        tokenizer.encode(np.zeros((2, 10, 3)))
