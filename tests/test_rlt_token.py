"""RL token: the bottleneck learns to reconstruct fixed embeddings; wrong widths are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rlt.errors import EmbeddingDimError
from rlt.rl_token import RLToken, RLTokenConfig, fit_rl_token
from rlt.state import EmbeddingPrior, StateProjectionEmbedder, token_config_for
from rlt.toy import BiasedReachPrior, PointReachEnv

torch.set_num_threads(1)


def _embeddings(count: int = 256, tokens: int = 4, width: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(count, 3)).astype(np.float32)
    projection = rng.normal(size=(3, tokens * width)).astype(np.float32)
    return np.tanh(latent @ projection).reshape(count, tokens, width)


def _token(seed: int = 0) -> RLToken:
    torch.manual_seed(seed)
    return RLToken(RLTokenConfig(num_tokens=4, embed_dim=16, z_dim=8, model_dim=32, encoder_layers=1))


def test_reconstruction_loss_falls_on_fixed_embeddings() -> None:
    losses = fit_rl_token(_token(), _embeddings(), steps=150, batch_size=64, learning_rate=3e-3)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])


def test_frozen_token_encodes_and_round_trips(tmp_path) -> None:
    token = _token()
    embeddings = _embeddings(32)
    fit_rl_token(token, embeddings, steps=5)
    token.freeze()
    z_rl = token.encode_numpy(embeddings)
    assert z_rl.shape == (32, 8)
    assert not any(parameter.requires_grad for parameter in token.parameters())
    token.save(tmp_path / "token.safetensors")
    np.testing.assert_allclose(RLToken.load(tmp_path / "token.safetensors").encode_numpy(embeddings), z_rl)


@pytest.mark.parametrize("shape", [(8, 4, 12), (8, 5, 16), (4, 16)])
def test_embedding_dimension_mismatch_is_a_clear_error(shape: tuple[int, ...]) -> None:
    token = _token()
    with pytest.raises(EmbeddingDimError, match=r"embeddings: expected shape B×4×16"):
        token.encode_numpy(np.zeros(shape, np.float32))
    with pytest.raises(EmbeddingDimError):
        fit_rl_token(token, np.zeros(shape, np.float32), steps=1)


def test_token_config_is_sized_from_the_prior_embeddings() -> None:
    prior = EmbeddingPrior(BiasedReachPrior(), StateProjectionEmbedder(4, 6, 12))
    config = token_config_for(prior, PointReachEnv().reset(seed=0)[0], z_dim=8)
    assert (config.num_tokens, config.embed_dim, config.z_dim) == (6, 12, 8)
    with pytest.raises(EmbeddingDimError, match="expected B×T×E from BiasedReachPrior"):
        token_config_for(BiasedReachPrior(), PointReachEnv().reset(seed=0)[0])


def _linear_r2(features: np.ndarray, targets: np.ndarray) -> float:
    """Mean R² on the second half of a least-squares fit (with bias) on the first half."""
    half = len(features) // 2
    design = np.hstack([features, np.ones((len(features), 1))])
    weights = np.linalg.lstsq(design[:half], targets[:half], rcond=None)[0]
    residual = targets[half:] - design[half:] @ weights
    return float(np.mean(1 - (residual**2).sum(0) / ((targets[half:] - targets[half:].mean(0)) ** 2).sum(0)))


@pytest.mark.parametrize("normalization", ["channel", "position"])
def test_the_token_reconstructs_what_varies_between_observations(normalization: str) -> None:
    """A VLA's prefix embeddings differ far more between positions than between observations: with statistics
    per position the token reconstructs what varies between observations; per channel its loss is dominated by
    the positional pattern (which its queries reproduce) and it reconstructs none of it."""
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(512, 2)).astype(np.float32)
    signal = np.tanh(latent @ rng.normal(size=(2, 4 * 16)).astype(np.float32)).reshape(512, 4, 16)
    embeddings = 5.0 * rng.normal(size=(1, 4, 16)).astype(np.float32) + 0.003 * signal
    torch.manual_seed(0)
    config = RLTokenConfig(num_tokens=4, embed_dim=16, z_dim=8, model_dim=32, encoder_layers=1)
    token = RLToken(dataclasses.replace(config, normalization=normalization))
    fit_rl_token(token, embeddings[:256], steps=300, batch_size=64, learning_rate=3e-3)
    token.freeze()
    held_out = torch.as_tensor(embeddings[256:])
    with torch.no_grad():
        reconstructed = token.decode(token.encode(held_out)) * token.embed_std + token.embed_mean
    error = torch.mean((reconstructed - held_out) ** 2) / torch.mean((held_out - held_out.mean(0)) ** 2)
    assert (error < 0.2) if normalization == "position" else (error > 0.5)


def test_a_per_position_token_round_trips(tmp_path) -> None:
    config = RLTokenConfig(num_tokens=4, embed_dim=16, z_dim=8, model_dim=32, normalization="position")
    token = RLToken(config)
    embeddings = _embeddings(32)
    fit_rl_token(token, embeddings, steps=5)
    assert token.embed_std.shape == (4, 16)
    token.freeze().save(tmp_path / "token.safetensors")
    loaded = RLToken.load(tmp_path / "token.safetensors")
    assert loaded.config.normalization == "position"
    np.testing.assert_allclose(loaded.encode_numpy(embeddings), token.encode_numpy(embeddings))
