"""The built-in VLA: flow-matching training, attention mask, embedding hook, KI gradient isolation, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from policies.checkpoint import load_checkpoint, save_checkpoint
from policies.training import (
    BCDataset,
    EpisodeArrays,
    TrainConfig,
    _batch_prompts,
    _fast_targets,
    build_dataset,
    chunk_episode,
    create_policy,
    train_bc,
)
from policies.vla import VLAConfig, VLAInputError, VLAPolicy, make_attention_mask
from policies.vla.model import ACTION_BLOCK, PREFIX_BLOCK, STATE_BLOCK, VLAModel, sample_tau, suffix_blocks

IMAGE = 48
PROMPT = "reach the goal position"


def toy_episodes(count: int = 4, steps: int = 24, seed: int = 0) -> list[EpisodeArrays]:
    """Episodes whose actions are a smooth function of the state (learnable), with noise images."""
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(count):
        state = np.cumsum(rng.normal(0, 0.2, size=(steps, 4)), axis=0).astype(np.float32)
        actions = np.tanh(state * np.array([1.0, -1.0, 0.5, 2.0], dtype=np.float32))
        images = rng.integers(0, 256, size=(steps, IMAGE, IMAGE, 3), dtype=np.uint8)
        episodes.append(
            EpisodeArrays({"corner": images}, state, actions, PROMPT, ["Advantage: positive"] * steps)
        )
    return episodes


def toy_config(**overrides) -> VLAConfig:
    """The tiny preset at 48 px with one camera and 4-D state/actions."""
    return VLAConfig.preset(
        "tiny", image_size=IMAGE, cameras=("corner",), state_dim=4, action_dim=4, **overrides
    )


def toy_policy(knowledge_insulation: bool = False, seed: int = 0) -> tuple[VLAPolicy, BCDataset]:
    """A fresh policy fitted on the toy dataset, and that dataset."""
    dataset = build_dataset(toy_episodes(), horizon=10)
    config = toy_config(knowledge_insulation=knowledge_insulation)
    return create_policy(config, dataset, seed=seed, fast_vocab_size=128), dataset


def observation_batch(dataset: BCDataset, size: int = 3) -> dict:
    """The first ``size`` samples of ``dataset`` as an ``ObservationBatch``."""
    return {
        "images": {"corner": dataset.images["corner"][:size]},
        "state": dataset.state[:size],
        "prompt": dataset.prompts[:size],
    }


def test_chunk_targets_repeat_last_action_and_mask_padding() -> None:
    actions = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunks, mask = chunk_episode(actions, horizon=3)
    assert chunks.shape == (5, 3, 2)
    np.testing.assert_array_equal(chunks[1], actions[1:4])
    np.testing.assert_array_equal(chunks[4], np.stack([actions[4]] * 3))
    assert mask[3].tolist() == [True, True, False]
    assert mask[4].tolist() == [True, False, False]


def test_flow_matching_reduces_loss_and_samples_close_to_targets() -> None:
    policy, dataset = toy_policy()
    batch = observation_batch(dataset, size=16)
    noise = np.random.default_rng(1).normal(size=(16, 10, 4)).astype(np.float32)
    before = np.abs(policy.infer(batch, noise=noise).actions - dataset.actions[:16]).mean()
    result = train_bc(policy, dataset, TrainConfig(steps=150, batch_size=24, progress=False, image_shift=0))
    chunk = policy.infer(batch, noise=noise)
    after = np.abs(chunk.actions - dataset.actions[:16]).mean()
    first = np.mean([h["flow_loss"] for h in result.history[:3]])
    last = np.mean([h["flow_loss"] for h in result.history[-3:]])
    assert chunk.actions.shape == (16, 10, 4) and chunk.actions.dtype == np.float32
    assert last < 0.5 * first, (first, last)
    assert after < 0.5 * before, (before, after)


def test_attention_mask_is_pi0_prefix_suffix_structure() -> None:
    prefix_valid = torch.tensor([[True] * 5 + [False] * 2])
    blocks = torch.cat([torch.full((7,), PREFIX_BLOCK), suffix_blocks(3)])
    valid = torch.cat([prefix_valid, torch.ones(1, 4, dtype=torch.bool)], dim=1)
    mask = make_attention_mask(valid, blocks)[0]
    prefix, pad, state, actions = slice(0, 5), slice(5, 7), 7, slice(8, 11)
    assert mask.shape == (11, 11)
    assert mask[prefix, prefix].all()  # bidirectional prefix
    assert not mask[:, pad].any()  # padding is never attended to
    assert not mask[:7, 7:].any()  # the prefix never sees the suffix
    assert mask[state, prefix].all() and mask[state, state] and not mask[state, actions].any()
    assert mask[actions, prefix].all() and mask[actions, state].all() and mask[actions, actions].all()
    assert blocks[7] == STATE_BLOCK and (blocks[8:] == ACTION_BLOCK).all()


def test_cached_two_pass_equals_joint_masked_attention() -> None:
    """Prefix encoded once + suffix per step is exactly π0's single joint pass under the full mask."""
    torch.manual_seed(0)
    model = VLAModel(toy_config(vocab_size=50)).eval()
    images = torch.rand(2, 1, 3, IMAGE, IMAGE) * 2 - 1
    tokens = torch.randint(2, 50, (2, model.config.max_prompt_tokens))
    token_valid = torch.arange(model.config.max_prompt_tokens)[None, :] < torch.tensor([[5], [9]])
    state, x_tau, tau = torch.randn(2, 4), torch.randn(2, 10, 4), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        prefix = model.encode_prefix(images, tokens, token_valid)
        cached = model.velocity(prefix, state, x_tau, tau)
        joint = _joint_velocity(model, images, tokens, token_valid, state, x_tau, tau)
    torch.testing.assert_close(cached, joint, atol=1e-5, rtol=1e-5)


def _joint_velocity(model, images, tokens, token_valid, state, x_tau, tau) -> torch.Tensor:
    """Reference: one pass over [prefix, suffix] where each layer mixes both weight sets in one attention."""
    from policies.vla.model import timestep_embedding

    p = torch.cat([model.image_encoder(images), model.token_embedding(tokens) + model.token_position], dim=1)
    time = timestep_embedding(tau, model.config.expert_width).unsqueeze(1).expand(-1, x_tau.shape[1], -1)
    actions = model.action_time_mlp(torch.cat([model.action_in(x_tau), time], dim=-1))
    s = torch.cat([model.state_proj(state).unsqueeze(1), actions], dim=1) + model.suffix_position
    prefix_valid = model.prefix_mask(token_valid)
    blocks = torch.cat([torch.full((p.shape[1],), PREFIX_BLOCK), suffix_blocks(model.config.action_horizon)])
    valid = torch.cat([prefix_valid, torch.ones(p.shape[0], s.shape[1], dtype=torch.bool)], dim=1)
    mask = make_attention_mask(valid, blocks)
    for backbone, expert in zip(model.backbone, model.expert, strict=True):
        qp, kp, vp = backbone.project(p)
        qs, ks, vs = expert.project(s)
        out = F.scaled_dot_product_attention(
            torch.cat([qp, qs], 2), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), attn_mask=mask[:, None]
        )
        p, s = backbone.finish(p, out[:, :, : p.shape[1]]), expert.finish(s, out[:, :, p.shape[1] :])
    return model.action_out(model.expert_norm(s[:, 1:]))


def test_embedding_hook_shapes_and_consistency() -> None:
    policy, dataset = toy_policy()
    batch = observation_batch(dataset, size=3)
    chunk = policy.infer(batch)
    embeddings, valid = policy.prefix_embeddings(batch)
    expected = (3, policy.config.prefix_len, policy.config.width)
    assert chunk.embeddings is not None and chunk.embeddings.shape == expected
    assert embeddings.shape == expected and valid.shape == expected[:2]
    np.testing.assert_allclose(chunk.embeddings, embeddings, atol=1e-6)
    assert valid[:, : policy.config.image_tokens].all() and not valid[:, -1].any()
    assert {"prefix_ms", "infer_ms"} <= set(chunk.timing)


def _backbone_parameters(model: VLAModel) -> dict[str, torch.nn.Parameter]:
    prefixes = ("image_encoder.", "token_embedding.", "token_position", "backbone.", "backbone_norm.")
    return {name: p for name, p in model.named_parameters() if name.startswith(prefixes)}


def _prefix_of_first_eight(policy: VLAPolicy, dataset: BCDataset):
    """The prefix pass (with gradients) over the first 8 samples, after clearing every gradient."""
    policy.model.zero_grad(set_to_none=True)
    tokens, token_valid = policy.tokenize(dataset.prompts[:8])
    images = torch.from_numpy(dataset.images["corner"][:8]).permute(0, 3, 1, 2)[:, None].float() / 127.5 - 1
    return policy.model.encode_prefix(images, tokens, token_valid)


def _flow_loss_backward(policy: VLAPolicy, dataset: BCDataset) -> None:
    model = policy.model
    prefix = _prefix_of_first_eight(policy, dataset)
    actions = policy.normalize_actions(dataset.actions[:8])
    generator = torch.Generator().manual_seed(0)
    state = torch.from_numpy(dataset.state[:8])
    mask = torch.ones(8, 10, dtype=torch.bool)
    model.flow_loss(
        prefix, state, actions, mask, torch.randn(actions.shape), sample_tau(8, generator)
    ).backward()


@pytest.mark.parametrize("knowledge_insulation", [True, False])
def test_knowledge_insulation_stops_expert_gradient_into_backbone(knowledge_insulation: bool) -> None:
    policy, dataset = toy_policy(knowledge_insulation=knowledge_insulation)
    _flow_loss_backward(policy, dataset)
    backbone = _backbone_parameters(policy.model)
    touched = [name for name, p in backbone.items() if p.grad is not None and p.grad.abs().sum() > 0]
    expert_grad = policy.model.action_out.weight.grad
    assert expert_grad is not None and expert_grad.abs().sum() > 0
    if knowledge_insulation:
        assert touched == []
    else:  # every layer's keys/values feed the expert (the last layer's MLP only feeds the embeddings)
        assert {"image_encoder.stem.0.weight", "token_embedding.weight", "backbone.0.qkv.weight"} <= set(
            touched
        )
        assert {f"backbone.{i}.qkv.weight" for i in range(policy.config.depth)} <= set(touched)


def test_knowledge_insulation_fast_loss_trains_backbone() -> None:
    policy, dataset = toy_policy(knowledge_insulation=True)
    prefix = _prefix_of_first_eight(policy, dataset)
    policy.model.fast_loss(prefix, _fast_targets(policy, dataset)[:8]).backward()
    touched = {
        name
        for name, p in _backbone_parameters(policy.model).items()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    every_layer = {f"backbone.{i}.qkv.weight" for i in range(policy.config.depth)}
    assert {"image_encoder.stem.0.weight", "image_encoder.proj.weight", "token_embedding.weight"} <= touched
    assert every_layer <= touched, sorted(every_layer - touched)
    assert policy.model.action_out.weight.grad is None  # the FAST loss never reaches the action expert
    result = train_bc(policy, dataset, TrainConfig(steps=30, batch_size=16, progress=False, log_every=5))
    assert result.history[-1]["fast_loss"] < result.history[0]["fast_loss"]
    assert all(h["fast_loss"] > 0 for h in result.history)


def test_cfg_beta_one_is_plain_conditioning_and_other_beta_differs() -> None:
    policy, dataset = toy_policy()
    batch = observation_batch(dataset)
    noise = np.random.default_rng(0).normal(size=(3, 10, 4)).astype(np.float32)
    plain = policy.infer(batch, conditions="Advantage: positive", noise=noise).actions
    beta_one = policy.infer(batch, conditions="Advantage: positive", cfg_beta=1.0, noise=noise).actions
    beta_two = policy.infer(batch, conditions="Advantage: positive", cfg_beta=2.0, noise=noise).actions
    np.testing.assert_array_equal(plain, beta_one)
    assert not np.allclose(plain, beta_two)


def test_guidance_callback_replaces_the_velocity() -> None:
    policy, dataset = toy_policy()
    noise = np.random.default_rng(0).normal(size=(3, 10, 4)).astype(np.float32)
    calls = []

    def zero_velocity(x_tau, tau, velocity_fn):
        calls.append((tau, velocity_fn(x_tau).shape))
        return torch.zeros_like(x_tau)

    chunk = policy.infer(observation_batch(dataset), noise=noise, guidance=zero_velocity, num_steps=4)
    expected = policy.norm_stats.actions.unnormalize(noise, policy.config.normalization)
    np.testing.assert_allclose(chunk.actions, expected, atol=1e-6)
    assert [tau for tau, _ in calls] == [0.0, 0.25, 0.5, 0.75] and calls[0][1] == (3, 10, 4)


def test_condition_dropout_and_unknown_words_tokenize() -> None:
    dataset = build_dataset(toy_episodes(count=1), horizon=10)
    rng = np.random.default_rng(0)
    assert set(_batch_prompts(dataset, np.arange(5), 1.0, rng)) == {PROMPT}
    assert set(_batch_prompts(dataset, np.arange(5), 0.0, rng)) == {f"{PROMPT} Advantage: positive"}
    policy, _ = toy_policy()
    tokens, valid = policy.tokenize(["reach the zebra quality: high"])
    assert valid.sum() > 5 and tokens[valid].min() >= 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["images"].pop("corner"), "images['corner']: missing camera"),
        (lambda b: b["images"].update(corner=b["images"]["corner"][:, :32, :32]), "expected (3, 48, 48, 3)"),
        (
            lambda b: b["images"].update(corner=b["images"]["corner"].astype(np.float32)),
            "dtype: expected uint8",
        ),
        (lambda b: b.update(state=b["state"][:, :3]), "state.shape: expected (3, 4)"),
        (lambda b: b.update(prompt=["reach " * 40] * 3), "expected at most max_prompt_tokens=32"),
    ],
)
def test_bad_observations_raise_naming_the_field(mutate, message: str) -> None:
    policy, dataset = toy_policy()
    batch = observation_batch(dataset)
    batch["images"] = dict(batch["images"])
    mutate(batch)
    with pytest.raises(VLAInputError, match=None) as error:
        policy.infer(batch)
    assert message in str(error.value)


def test_mismatched_action_dimension_raises() -> None:
    policy, dataset = toy_policy()
    wrong = BCDataset(
        dataset.images, dataset.state, dataset.prompts, dataset.actions[..., :3], dataset.action_mask
    )
    with pytest.raises(VLAInputError, match=r"actions.shape: expected \(96, 10, 4\)"):
        train_bc(policy, wrong, TrainConfig(steps=1, progress=False))
    with pytest.raises(VLAInputError, match="action_dim=4"):
        policy.normalize_actions(np.zeros((2, 10, 5)))


@pytest.mark.parametrize(  # the smallest image each preset accepts: 8 px per patch-grid cell
    ("size", "side", "horizon", "image_tokens_per_camera"), [("small", 64, 5, 8 * 8), ("tiny", 48, 3, 6 * 6)]
)
def test_two_cameras_sizes_and_horizons_infer_round_trip_and_name_a_missing_camera(
    size: str, side: int, horizon: int, image_tokens_per_camera: int, tmp_path
) -> None:
    cameras, rng = ("a", "b"), np.random.default_rng(0)
    episodes = [
        EpisodeArrays(
            {camera: rng.integers(0, 256, size=(12, side, side, 3), dtype=np.uint8) for camera in cameras},
            rng.normal(size=(12, 4)).astype(np.float32),
            rng.uniform(-1, 1, size=(12, 4)).astype(np.float32),
            PROMPT,
        )
        for _ in range(2)
    ]
    dataset = build_dataset(episodes, horizon)
    config = VLAConfig.preset(
        size, cameras=cameras, image_size=side, state_dim=4, action_dim=4, action_horizon=horizon
    )
    policy = create_policy(config, dataset)
    train_bc(policy, dataset, TrainConfig(steps=2, batch_size=4, progress=False))
    batch = {
        "images": {camera: dataset.images[camera][:2] for camera in cameras},
        "state": dataset.state[:2],
        "prompt": dataset.prompts[:2],
    }
    noise = rng.normal(size=(2, horizon, 4)).astype(np.float32)
    chunk = policy.infer(batch, noise=noise)
    prefix_tokens = 2 * image_tokens_per_camera + config.max_prompt_tokens  # cameras' patches, then prompt
    assert chunk.actions.shape == (2, horizon, 4) and chunk.actions.dtype == np.float32
    assert chunk.embeddings is not None and chunk.embeddings.shape == (2, prefix_tokens, policy.config.width)
    _, valid = policy.prefix_embeddings(batch)
    assert valid[:, : 2 * image_tokens_per_camera].all() and not valid[:, -1].any()
    version = save_checkpoint(policy, tmp_path / "checkpoint")
    loaded = load_checkpoint(tmp_path / "checkpoint")
    assert loaded.version == version and loaded.config == policy.config
    again = loaded.infer(batch, noise=noise)
    np.testing.assert_array_equal(again.actions, chunk.actions)
    np.testing.assert_array_equal(again.embeddings, chunk.embeddings)
    with pytest.raises(VLAInputError, match=r"images\['b'\]: missing camera, expected cameras \['a', 'b'\]"):
        loaded.infer({**batch, "images": {"a": batch["images"]["a"]}})
