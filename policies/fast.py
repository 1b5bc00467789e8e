"""FAST action tokenizer (Pertsch et al., 2025): DCT compression + byte-pair encoding of action chunks.

Pipeline per chunk ``H×D``: quantile-normalize each dimension (1st/99th percentile → ±1, clipped) → DCT-II along
time, orthonormal (``scipy.fft.dct``) → multiply by ``scale`` (γ) and round to integers → flatten low frequency
first, interleaving dimensions (coefficient ``k`` of every dimension before ``k+1``) → map each integer to one
unicode character → BPE (``tokenizers``) trained on the fitted chunks. Decoding inverts every step. Token sequences
that do not decode to exactly ``H·D`` coefficients (e.g. sampled by a model) are padded with zeros or truncated
and reported as invalid rather than raising.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.fft import dct, idct
from tokenizers import Tokenizer, models, trainers

_SYMBOL_BASE = 0x4E00  # start of a large contiguous block of printable characters (CJK ideographs)
_FORMAT = "flywheel-fast-v1"


class FASTError(ValueError):
    """A FAST tokenizer that cannot be fitted, applied or loaded (one line naming the field)."""


@dataclass
class DecodeResult:
    """Decoded chunks (``N×H×D`` float32) and, per chunk, whether its tokens decoded to exactly ``H·D`` symbols."""

    actions: np.ndarray
    valid: np.ndarray


class FASTTokenizer:
    """Fitted FAST tokenizer for chunks of shape ``horizon×action_dim``. Build with :meth:`fit` or :meth:`load`."""

    def __init__(
        self,
        horizon: int,
        action_dim: int,
        scale: float,
        max_coefficient: int,
        q01: np.ndarray,
        q99: np.ndarray,
        bpe: Tokenizer,
    ) -> None:
        self.horizon = horizon
        self.action_dim = action_dim
        self.scale = scale
        self.max_coefficient = max_coefficient
        self.q01 = np.asarray(q01, dtype=np.float32)
        self.q99 = np.asarray(q99, dtype=np.float32)
        self.bpe = bpe

    @property
    def vocab_size(self) -> int:
        """Number of BPE token ids (ids are ``0 .. vocab_size-1``)."""
        return self.bpe.get_vocab_size()

    @classmethod
    def fit(
        cls,
        chunks: np.ndarray,
        vocab_size: int = 1024,
        scale: float = 10.0,
        min_frequency: int = 2,
    ) -> FASTTokenizer:
        """Fit quantiles and a BPE vocabulary on ``chunks`` (``N×H×D`` raw actions)."""
        chunks = _check_chunks(np.asarray(chunks, dtype=np.float32))
        _, horizon, action_dim = chunks.shape
        flat = chunks.reshape(-1, action_dim)
        q01, q99 = np.quantile(flat, 0.01, axis=0), np.quantile(flat, 0.99, axis=0)
        # With normalized actions in [-1, 1] an orthonormal DCT coefficient is bounded by sqrt(H).
        max_coefficient = int(np.ceil(np.sqrt(horizon) * scale))
        tokenizer = cls(horizon, action_dim, scale, max_coefficient, q01, q99, Tokenizer(models.BPE()))
        alphabet = [chr(_SYMBOL_BASE + i) for i in range(2 * max_coefficient + 1)]
        if vocab_size < len(alphabet):
            raise FASTError(
                f"vocab_size: expected at least {len(alphabet)} (one per coefficient), got {vocab_size}"
            )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=alphabet,
            show_progress=False,
            max_token_length=64,
        )
        texts = [tokenizer._symbols_to_text(row) for row in tokenizer._chunks_to_symbols(chunks)]
        tokenizer.bpe.train_from_iterator(texts, trainer=trainer)
        return tokenizer

    def encode(self, chunks: np.ndarray) -> list[list[int]]:
        """Token ids for each chunk of ``chunks`` (``N×H×D`` or a single ``H×D``)."""
        chunks = np.asarray(chunks, dtype=np.float32)
        if chunks.ndim == 2:
            chunks = chunks[None]
        self._check_shape(chunks)
        texts = [self._symbols_to_text(row) for row in self._chunks_to_symbols(chunks)]
        return [encoding.ids for encoding in self.bpe.encode_batch(texts)]

    def decode(self, token_ids: list[list[int]]) -> DecodeResult:
        """Chunks for each token sequence; undecodable parts are dropped, counts fixed, and ``valid`` set False."""
        size = self.horizon * self.action_dim
        symbols = np.zeros((len(token_ids), size), dtype=np.int64)
        valid = np.ones(len(token_ids), dtype=bool)
        for row, ids in enumerate(token_ids):
            values, ok = self._ids_to_symbols(ids)
            valid[row] = ok and len(values) == size
            values = values[:size]
            symbols[row, : len(values)] = values
        return DecodeResult(self._symbols_to_chunks(symbols), valid)

    def _ids_to_symbols(self, ids: list[int]) -> tuple[list[int], bool]:
        ok = True
        values: list[int] = []
        for token_id in ids:
            piece = self.bpe.id_to_token(int(token_id)) if 0 <= int(token_id) < self.vocab_size else None
            if piece is None:
                ok = False
                continue
            for char in piece:
                value = ord(char) - _SYMBOL_BASE - self.max_coefficient
                if abs(value) > self.max_coefficient:
                    ok = False
                    continue
                values.append(value)
        return values, ok

    def _chunks_to_symbols(self, chunks: np.ndarray) -> np.ndarray:
        normalized = 2.0 * (chunks - self.q01) / np.maximum(self.q99 - self.q01, 1e-6) - 1.0
        coefficients = dct(np.clip(normalized, -1.0, 1.0), type=2, norm="ortho", axis=1)
        quantized = np.clip(np.round(coefficients * self.scale), -self.max_coefficient, self.max_coefficient)
        return quantized.astype(np.int64).reshape(len(chunks), -1)  # row-major H×D: low frequency first

    def _symbols_to_chunks(self, symbols: np.ndarray) -> np.ndarray:
        coefficients = symbols.reshape(-1, self.horizon, self.action_dim).astype(np.float64) / self.scale
        normalized = idct(coefficients, type=2, norm="ortho", axis=1)
        return ((normalized + 1.0) / 2.0 * np.maximum(self.q99 - self.q01, 1e-6) + self.q01).astype(
            np.float32
        )

    def _symbols_to_text(self, symbols: np.ndarray) -> str:
        return "".join(chr(_SYMBOL_BASE + self.max_coefficient + int(value)) for value in symbols)

    def _check_shape(self, chunks: np.ndarray) -> None:
        if chunks.ndim != 3 or chunks.shape[1:] != (self.horizon, self.action_dim):
            raise FASTError(
                f"chunks: expected shape (N, {self.horizon}, {self.action_dim}), got {tuple(chunks.shape)}"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict (the BPE model is embedded as its own JSON string)."""
        return {
            "format": _FORMAT,
            "horizon": self.horizon,
            "action_dim": self.action_dim,
            "scale": self.scale,
            "max_coefficient": self.max_coefficient,
            "q01": self.q01.astype(float).tolist(),
            "q99": self.q99.astype(float).tolist(),
            "bpe": self.bpe.to_str(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> FASTTokenizer:
        """Inverse of :meth:`to_dict` with validation."""
        if data.get("format") != _FORMAT:
            raise FASTError(f"format: expected {_FORMAT!r}, got {data.get('format')!r}")
        try:
            tokenizer = cls(
                horizon=int(data["horizon"]),
                action_dim=int(data["action_dim"]),
                scale=float(data["scale"]),
                max_coefficient=int(data["max_coefficient"]),
                q01=np.asarray(data["q01"], dtype=np.float32),
                q99=np.asarray(data["q99"], dtype=np.float32),
                bpe=Tokenizer.from_str(data["bpe"]),
            )
        except KeyError as error:
            raise FASTError(f"{error.args[0]}: missing from the FAST tokenizer file") from error
        except Exception as error:
            raise FASTError(f"bpe: cannot parse the BPE model ({error})") from error
        if tokenizer.q01.shape != (tokenizer.action_dim,) or tokenizer.q99.shape != (tokenizer.action_dim,):
            raise FASTError(f"q01/q99: expected length action_dim={tokenizer.action_dim}")
        return tokenizer

    def save(self, path: str | Path) -> None:
        """Write as one JSON file."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> FASTTokenizer:
        """Read a file written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise FASTError(f"{path}: cannot read FAST tokenizer ({error})") from error
        return cls.from_dict(data)


def naive_bin_tokenize(chunks: np.ndarray, q01: np.ndarray, q99: np.ndarray, bins: int = 256) -> np.ndarray:
    """Baseline: one token per dimension per step, ``bins`` uniform bins over the quantile-normalized [−1, 1]."""
    normalized = np.clip(2.0 * (chunks - q01) / np.maximum(q99 - q01, 1e-6) - 1.0, -1.0, 1.0)
    return np.minimum(((normalized + 1.0) / 2.0 * bins).astype(np.int64), bins - 1)


def naive_bin_detokenize(tokens: np.ndarray, q01: np.ndarray, q99: np.ndarray, bins: int = 256) -> np.ndarray:
    """Inverse of :func:`naive_bin_tokenize` (bin centres)."""
    normalized = (tokens.astype(np.float64) + 0.5) / bins * 2.0 - 1.0
    return ((normalized + 1.0) / 2.0 * np.maximum(q99 - q01, 1e-6) + q01).astype(np.float32)


def _check_chunks(chunks: np.ndarray) -> np.ndarray:
    if chunks.ndim != 3 or chunks.shape[0] == 0 or 0 in chunks.shape:
        raise FASTError(f"chunks: expected a non-empty array of shape (N, H, D), got {tuple(chunks.shape)}")
    if not np.isfinite(chunks).all():
        raise FASTError("chunks: expected finite values, got NaN or inf")
    return chunks
