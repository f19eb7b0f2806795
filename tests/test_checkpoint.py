"""Checkpoint loading: every layout, round trips and one-line errors for bad files."""
import pickle
import warnings

import numpy as np
import pytest
import torch
from helpers import small_model

from agent.checkpoint import load_world_model, save_world_model
from agent.errors import CheckpointError


class Rogue:
    """An arbitrary class: unpickling it would run code, so weights_only loading must refuse it."""


def _small_model(seed=0, **dims):
    return small_model(seed, **dims)


def test_own_format_round_trips_exactly(tmp_path):
    model = _small_model()
    path = save_world_model(model, tmp_path / "m.pt")
    loaded = load_world_model(path)
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_single_task_model_round_trips(tmp_path):
    model = _small_model(tasks=["cartpole-balance"], task_dim=0)
    loaded = load_world_model(save_world_model(model, tmp_path / "s.pt"))
    obs = torch.randn(4, 24)
    assert not loaded.multitask
    assert torch.equal(loaded.encode(obs), model.eval().encode(obs))


@pytest.mark.parametrize("name,num_q,latent,task_dim", [
    ("published/mt30_1M_steps_045dist_fp16.pt", 2, 128, 96),
    ("published/mt30_1M_steps_045dist_int8.pt", 2, 128, 96),
    ("published/mt30_1M_steps_045dist_mixed.pt", 2, 128, 96),
    ("upstream_new_format.pt", 5, 64, 64),
    ("upstream_old_format.pt", 5, 64, 64),
])
def test_dimensions_are_inferred(fixtures_dir, name, num_q, latent, task_dim):
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        model = load_world_model(fixtures_dir / name)
    assert not warned, [str(w.message)[:80] for w in warned]  # torch's own loading warnings are not the reader's
    assert (model.cfg.num_q, model.cfg.latent_dim, model.cfg.task_dim) == (num_q, latent, task_dim)
    assert len(model.cfg.tasks) == 30 and model.cfg.task_action_dims[7] == 1


def test_int8_file_dequantizes_to_integers(fixtures_dir):
    model = load_world_model(fixtures_dir / "published/mt30_1M_steps_045dist_int8.pt")
    weight = model._reward[0].weight
    assert torch.equal(weight, weight.round())
    assert (weight == 0).float().mean() > 0.8  # scale 1.0 rounds most weights to zero


def _one_line_error(path, *fragments):
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as info:
            load_world_model(path)
    assert not warned, [str(w.message) for w in warned]  # a warning is a second line on the user's terminal
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_bad_files_give_one_clear_line(tmp_path, fixtures_dir):
    _one_line_error(tmp_path / "missing.pt", "no such file")
    good = save_world_model(_small_model(), tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _one_line_error(truncated, "not a readable torch checkpoint")
    rogue = tmp_path / "rogue.pt"
    rogue.write_bytes(pickle.dumps({"payload": Rogue()}))
    _one_line_error(rogue, "not a readable torch checkpoint")
    protocol_89 = tmp_path / "random.pt"  # random bytes that open with the PROTO opcode (1 file in 256)
    protocol_89.write_bytes(b"\x80\x59" + np.random.default_rng(0).bytes(2046))
    _one_line_error(protocol_89, "not a readable torch checkpoint")
    state = torch.load(fixtures_dir / "published/mt30_1M_steps_045dist_fp16.pt", map_location="cpu", weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("_reward.")}
    no_head = tmp_path / "no_reward_head.pt"
    torch.save(state, no_head)
    _one_line_error(no_head, "_reward")
    not_a_model = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, not_a_model)
    _one_line_error(not_a_model, "not contain a TD-MPC2 world model")
