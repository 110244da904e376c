"""Selective Sample Replay (shared.replay): probabilities, FIFO buffer, seeded sampling, safetensors resume."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.config import ConfigError
from shared.replay import ReplayBuffer, check_replay_size, ssr_probabilities

SCALARS = {"advantage": torch.float32, "prompt_index": torch.int64}
SEQUENCES = {"token_ids": torch.int64, "old_logprobs": torch.float32}


def make_entry(index, advantage, length=None):
    length = index % 4 + 1 if length is None else length
    return {
        "advantage": torch.tensor(advantage, dtype=torch.float32),
        "prompt_index": torch.tensor(index, dtype=torch.int64),
        "token_ids": torch.arange(length, dtype=torch.int64) + 100 * index,
        "old_logprobs": -torch.linspace(0.1, 1.0, length, dtype=torch.float32) * (index + 1),
    }


def make_buffer(capacity=8, alpha=1.0):
    return ReplayBuffer(capacity, SCALARS, SEQUENCES, alpha=alpha)


def indices(entries):
    return [int(entry["prompt_index"]) for entry in entries]


# ----------------------------------------------------------------------------- probabilities


def test_ssr_probabilities_by_hand():
    advantages = torch.tensor([0.5, -1.0, 0.0, 2.0, -0.5])  # |A| = 0.5, 1, 0, 2, 0.5
    # alpha 0: uniform over the 4 non-zero entries
    assert ssr_probabilities(advantages, 0.0).tolist() == [0.25, 0.25, 0.0, 0.25, 0.25]
    # alpha 1: |A| / 4 = 0.125, 0.25, 0, 0.5, 0.125
    assert ssr_probabilities(advantages, 1.0).tolist() == [0.125, 0.25, 0.0, 0.5, 0.125]
    # alpha 2: |A|^2 = 0.25, 1, 0, 4, 0.25 -> / 5.5
    expected = torch.tensor([0.25, 1.0, 0.0, 4.0, 0.25], dtype=torch.float64) / 5.5
    assert torch.allclose(ssr_probabilities(advantages, 2.0), expected, rtol=0, atol=1e-15)
    assert ssr_probabilities(advantages, 2.0).dtype == torch.float64
    # large alpha does not overflow: (|A| / 2)^2000 -> 1 for the largest, 0.5^2000 and 0.25^2000 underflow to 0
    assert ssr_probabilities(advantages, 2000.0).tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_ssr_probabilities_refuse_bad_input():
    with pytest.raises(ValueError, match="no entry has a non-zero advantage"):
        ssr_probabilities(torch.zeros(3))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        ssr_probabilities(torch.ones(2), -1.0)
    with pytest.raises(ValueError, match="NaN at positions \\[1\\]"):
        ssr_probabilities(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D tensor"):
        ssr_probabilities(torch.ones(2, 2))


def test_check_replay_size_names_the_field():
    with pytest.raises(
        ConfigError, match="^replay.size must be a whole number of samples >= 1 when replay is on, got 0"
    ):
        check_replay_size(0)
    with pytest.raises(ConfigError, match="^capacity must be a whole number of samples >= 1"):
        ReplayBuffer(0, SCALARS)
    assert check_replay_size(3) == 3


# ----------------------------------------------------------------------------- buffer


def test_add_skips_zero_advantage_and_evicts_oldest_first():
    buffer = make_buffer(capacity=3)
    stored = buffer.add([make_entry(0, 1.0), make_entry(1, 0.0), make_entry(2, -0.5)])
    assert stored == 2 and indices(buffer.entries) == [0, 2]  # entry 1 (advantage 0) never enters
    buffer.add([make_entry(3, 0.25)])
    assert indices(buffer.entries) == [0, 2, 3]
    buffer.add([make_entry(4, 2.0), make_entry(5, 0.0)])
    assert indices(buffer.entries) == [2, 3, 4]  # full: the oldest (0) went first
    buffer.add([make_entry(6, 1.0), make_entry(7, 1.0), make_entry(8, 1.0), make_entry(9, 1.0)])
    assert indices(buffer.entries) == [7, 8, 9]  # more than capacity at once: the last three stay
    assert buffer.advantages().tolist() == [1.0, 1.0, 1.0]


def test_add_refuses_malformed_entries_without_storing_any():
    buffer = make_buffer()
    bad = make_entry(1, 1.0)
    bad["token_ids"] = bad["token_ids"].to(torch.int32)
    with pytest.raises(ValueError, match="entry 1 field 'token_ids' must be a 1-D tensor of torch.int64"):
        buffer.add([make_entry(0, 1.0), bad])
    assert len(buffer) == 0
    missing = make_entry(0, 1.0)
    del missing["old_logprobs"]
    with pytest.raises(ValueError, match="missing keys \\['old_logprobs'\\]"):
        buffer.add([missing])
    with pytest.raises(ValueError, match="NaN advantage"):
        buffer.add([make_entry(0, float("nan"))])
    with pytest.raises(ValueError, match="advantage_field 'advantage' must be one of the scalar_fields with a float"):
        ReplayBuffer(4, {"advantage": torch.int64})


def test_probabilities_follow_the_stored_advantages():
    buffer = make_buffer(alpha=2.0)
    buffer.add([make_entry(0, 1.0), make_entry(1, -2.0), make_entry(2, 0.0), make_entry(3, 1.0)])
    # stored: 0, 1, 3 with |A|^2 = 1, 4, 1 -> 1/6, 4/6, 1/6
    assert torch.allclose(buffer.probabilities(), torch.tensor([1, 4, 1], dtype=torch.float64) / 6, atol=1e-15)


def test_sample_is_reproducible_distinct_and_keeps_entries():
    buffer = make_buffer(capacity=16)
    buffer.add([make_entry(i, (i % 5) - 2.0) for i in range(16)])  # advantages -2..2; i = 2, 7, 12 have 0
    first = buffer.sample(5, torch.Generator().manual_seed(7))
    again = buffer.sample(5, torch.Generator().manual_seed(7))
    assert indices(first) == indices(again)
    assert len(set(indices(first))) == 5  # without replacement
    for a, b in zip(first, again):
        assert all(torch.equal(a[name], b[name]) for name in a)
    assert len(buffer) == 13  # sampling removes nothing (16 minus the 3 zero-advantage entries)
    assert buffer.sample(0, torch.Generator()) == []
    with pytest.raises(ValueError, match="cannot draw 14 distinct samples from a replay buffer holding 13"):
        buffer.sample(14, torch.Generator())
    every = buffer.sample(13, torch.Generator().manual_seed(1))
    assert sorted(indices(every)) == sorted(indices(buffer.entries))


def test_single_draw_frequencies_match_probabilities():
    # one draw at a time: entry j is drawn with P(j) = |A_j| / sum |A| = (1, 2, 1) / 4 with alpha 1
    buffer = make_buffer()
    buffer.add([make_entry(0, 1.0), make_entry(1, -2.0), make_entry(2, 1.0)])
    generator = torch.Generator().manual_seed(0)
    counts = {0: 0, 1: 0, 2: 0}
    draws = 4000
    for _ in range(draws):
        counts[indices(buffer.sample(1, generator))[0]] += 1
    # binomial std of a frequency near 0.5 over 4000 draws is 0.008; allow 4 std
    assert abs(counts[1] / draws - 0.5) < 0.032
    assert abs(counts[0] / draws - 0.25) < 0.028 and abs(counts[2] / draws - 0.25) < 0.028


def test_state_dict_round_trip_through_safetensors(tmp_path):
    buffer = make_buffer(capacity=6, alpha=1.5)
    buffer.add([make_entry(i, (-1.0) ** i * (i + 1) / 4, length=i % 3 + 1) for i in range(9)])  # evicts 0..2
    state = buffer.state_dict()
    assert state["sequence/token_ids/values"].shape == (6, 3)  # padded to the longest stored sequence
    assert state["sequence/token_ids/lengths"].tolist() == [1, 2, 3, 1, 2, 3]
    assert state["scalar/prompt_index"].tolist() == [3, 4, 5, 6, 7, 8]
    save_file(state, str(tmp_path / "replay.safetensors"))

    resumed = make_buffer(capacity=6, alpha=1.5)
    resumed.load_state_dict(load_file(str(tmp_path / "replay.safetensors")))
    for a, b in zip(buffer.entries, resumed.entries):
        assert set(a) == set(b) and all(torch.equal(a[name], b[name]) and a[name].dtype == b[name].dtype for name in a)

    # the same generator state then gives the same draws, and the same buffer after more adds (eviction included)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(4):
        new = [make_entry(20 + 2 * step + j, 0.5 * (j + 1)) for j in range(2)]
        buffer.add(new)
        resumed.add(new)
        draw_a, draw_b = buffer.sample(3, gen_a), resumed.sample(3, gen_b)
        assert indices(draw_a) == indices(draw_b)
        assert all(torch.equal(x["old_logprobs"], y["old_logprobs"]) for x, y in zip(draw_a, draw_b))
    assert indices(buffer.entries) == indices(resumed.entries)


def test_empty_state_round_trip(tmp_path):
    save_file(make_buffer().state_dict(), str(tmp_path / "empty.safetensors"))
    resumed = make_buffer()
    resumed.load_state_dict(load_file(str(tmp_path / "empty.safetensors")))
    assert len(resumed) == 0
    with pytest.raises(ValueError, match="the replay buffer is empty"):
        resumed.probabilities()


def test_load_refuses_other_capacity_or_fields():
    buffer = make_buffer(capacity=4)
    buffer.add([make_entry(0, 1.0)])
    with pytest.raises(ValueError, match="saved with capacity 4, this buffer has 5; resume with the same replay size"):
        make_buffer(capacity=5).load_state_dict(buffer.state_dict())
    with pytest.raises(
        ValueError,
        match="missing \\['sequence/mask/lengths', 'sequence/mask/values'\\], unexpected \\['sequence/old_logprobs/",
    ):
        ReplayBuffer(4, SCALARS, {"token_ids": torch.int64, "mask": torch.bool}).load_state_dict(buffer.state_dict())
    state = buffer.state_dict()
    state["scalar/prompt_index"] = state["scalar/prompt_index"].to(torch.int32)
    with pytest.raises(ValueError, match="scalar/prompt_index must be \\[1\\] of torch.int64"):
        make_buffer(capacity=4).load_state_dict(state)
