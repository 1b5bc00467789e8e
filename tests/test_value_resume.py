"""The value model's training resumes: a training stopped after its state was written at step k (the
``policies.train_state`` format) continues from k on the next call with the same arguments and ends with the
uninterrupted run's weights; the state file is removed when training ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import recap.value
from policies.train_state import load_state
from recap import ValueConfig, train_value
from tests.test_recap_value import deterministic_chain

torch.set_num_threads(1)

CONFIG = ValueConfig(
    hidden_dim=32, train_steps=40, eval_every=10, batch_size=32, dropout=0.1, ensemble_size=2
)


class Interrupted(Exception):
    """Stands in for the SIGKILL: raised right after a state was written."""


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.members.state_dict().items()}


@pytest.mark.parametrize("stop_after", [4, 6])  # the end of the first member; mid-way through the second
def test_a_stopped_value_training_continues_from_its_state(tmp_path, monkeypatch, stop_after):
    rng = np.random.default_rng(0)
    episodes = [deterministic_chain(rng) for _ in range(12)]
    straight = train_value(episodes, CONFIG)

    writes = []
    save_state = recap.value.save_state

    def save_then_stop(path, state):
        save_state(path, state)
        writes.append(path)
        if len(writes) == stop_after:
            raise Interrupted

    monkeypatch.setattr(recap.value, "save_state", save_then_stop)
    with pytest.raises(Interrupted):
        train_value(episodes, CONFIG, state_dir=tmp_path)
    monkeypatch.undo()
    [state_file] = set(writes)
    stopped_at = load_state(state_file)["step"]
    assert stopped_at == stop_after * CONFIG.eval_every

    resumed = train_value(episodes, CONFIG, state_dir=tmp_path)
    assert resumed.resumed_from_step == stopped_at
    assert resumed.training_loss == pytest.approx(straight.training_loss)
    expected, found = _weights(straight), _weights(resumed)
    for name, value in expected.items():
        assert torch.equal(value, found[name]), name
    assert not state_file.exists()
    assert straight.resumed_from_step is None
