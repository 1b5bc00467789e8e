"""Devices and mixed precision: ``auto`` on a CPU machine, checkpoints across devices, bf16 autocast, resumable
training state (single process)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from policies.checkpoint import load_checkpoint, save_checkpoint
from policies.device import DeviceError, autocast, describe, resolve_device
from policies.train_state import TrainStateError, load_state, save_state
from policies.training import EpisodeArrays, TrainConfig, build_dataset, create_policy, train_bc
from policies.vla.config import VLAConfig

CONFIG = VLAConfig.preset(
    "tiny", cameras=("corner2",), image_size=48, state_dim=4, action_dim=3, action_horizon=4
)


def _dataset():
    rng = np.random.default_rng(0)
    episodes = [
        EpisodeArrays(
            images={"corner2": rng.integers(0, 255, (12, 48, 48, 3), dtype=np.uint8)},
            state=rng.normal(size=(12, 4)).astype(np.float32),
            actions=np.tanh(rng.normal(size=(12, 3))).astype(np.float32),
            prompt="reach the goal",
        )
        for _ in range(3)
    ]
    return build_dataset(episodes, CONFIG.action_horizon)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: auto would pick it")
def test_auto_picks_the_cpu_here_and_records_it():
    device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert describe(device) == {"device": "cpu", "device_name": "cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_an_absent_accelerator_is_a_one_line_error():
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="expected one of"):
        resolve_device("tpu")


def test_checkpoint_from_another_device_loads_with_map_location(tmp_path):
    """Weights on the ``meta`` device (no storage, like a GPU this machine does not have) are saved from a
    materialized copy; the file loads onto the CPU and into a policy moved to the device asked for."""
    dataset = _dataset()
    policy = create_policy(CONFIG, dataset)
    state = {name: value.detach().clone() for name, value in policy.model.state_dict().items()}
    path = save_state(tmp_path / "state.pt", {"model": {k: v.to("meta") for k, v in state.items()}})
    on_meta = load_state(path)["model"]
    assert all(t.device.type == "meta" for t in on_meta.values())  # meta tensors have no data to map
    path = save_state(tmp_path / "state.pt", {"model": state})
    loaded = load_state(path)["model"]
    assert all(t.device.type == "cpu" for t in loaded.values())
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    save_checkpoint(policy, tmp_path / "ckpt")
    again = load_checkpoint(tmp_path / "ckpt", device="auto")
    assert again.device == resolve_device("auto")
    assert all(torch.equal(v.cpu(), state[k]) for k, v in again.model.state_dict().items())


def test_a_torn_state_file_is_a_one_line_error(tmp_path):
    (tmp_path / "train_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainStateError, match="unreadable training state"):
        load_state(tmp_path / "train_state.pt")
    assert load_state(tmp_path / "missing.pt") is None


def test_bf16_autocast_training_step_on_cpu_is_finite():
    dataset = _dataset()
    policy = create_policy(CONFIG, dataset)
    with autocast(torch.device("cpu"), enabled=True) as active:
        assert active and torch.get_autocast_dtype("cpu") == torch.bfloat16
    config = TrainConfig(steps=3, batch_size=4, log_every=1, progress=False, bf16=True, device="cpu")
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    result = train_bc(policy, dataset, config)
    assert [row["step"] for row in result.history] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in result.history)
    assert all(v.dtype == torch.float32 for v in policy.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_interrupted_training_resumes_bit_for_bit(tmp_path):
    """Stop after 6 of 10 steps (the state is written every 3), resume: same weights as 10 steps straight."""
    dataset = _dataset()
    settings = dict(steps=10, batch_size=4, log_every=1, progress=False, checkpoint_every=3)
    straight = create_policy(CONFIG, dataset, seed=1)
    train_bc(straight, dataset, TrainConfig(**settings, state_dir=tmp_path / "a"))

    first = create_policy(CONFIG, dataset, seed=1)

    def stop(step, _policy):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_bc(first, dataset, TrainConfig(**settings, eval_every=1, state_dir=tmp_path / "b"), stop)
    assert load_state(tmp_path / "b" / "train_state.pt")["step"] == 6
    resumed = create_policy(CONFIG, dataset, seed=1)
    result = train_bc(resumed, dataset, TrainConfig(**settings, state_dir=tmp_path / "b"))
    assert result.resumed_from == 6
    assert [row["step"] for row in result.history] == list(range(1, 11))
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
