"""Parsing the τ option and the samplers: ranges, reproducibility and resuming after a restart."""

from __future__ import annotations

import json

import pytest
import torch

from dfkd.config.tau import TauSpec, parse_tau, parse_tau_range
from dfkd.errors import DfkdError
from dfkd.tau import FixedTau, StochasticTau, make_sampler


def test_parse_tau_forms() -> None:
    assert parse_tau("stochastic") == TauSpec("stochastic")
    assert parse_tau(" Stochastic ") == TauSpec("stochastic")
    assert parse_tau("4") == TauSpec("fixed", value=4.0)
    assert parse_tau("2.5") == TauSpec("fixed", value=2.5)
    assert parse_tau("1") == TauSpec("fixed", value=1.0)
    grid = parse_tau("grid")
    assert grid.mode == "grid" and grid.grid == tuple(float(v) for v in range(2, 21)) and len(grid.grid) == 19
    assert parse_tau("grid:2,4,8,16") == TauSpec("grid", grid=(2.0, 4.0, 8.0, 16.0))
    assert parse_tau("grid:3") == TauSpec("grid", grid=(3.0,))


@pytest.mark.parametrize(
    "bad", ["abc", "0.5", "grid:", "grid:2,x", "-3", "nan", "inf", "", "grid:2,0.5", "grid:2,,4", "grid:4,4", "0"]
)
def test_parse_tau_rejects(bad: str) -> None:
    with pytest.raises(DfkdError, match="tau"):
        parse_tau(bad)


def test_parse_tau_error_names_the_accepted_forms() -> None:
    with pytest.raises(DfkdError, match="'stochastic', a number >= 1 .* 'grid' .* 'grid:2,4,8,16'"):
        parse_tau("abc")


def test_parse_tau_range() -> None:
    assert parse_tau_range("2,20") == (2.0, 20.0)
    assert parse_tau_range("1, 4.5") == (1.0, 4.5)
    for bad in ["20,2", "3,3", "0.5,4", "2", "2,4,6", "a,b", "nan,4", "2,inf", ""]:
        with pytest.raises(DfkdError, match="1 <= low < high"):
            parse_tau_range(bad)


def test_fixed_tau() -> None:
    sampler = FixedTau(4.0)
    assert [sampler.sample(128) for _ in range(3)] == [4.0, 4.0, 4.0]
    restored = FixedTau(4.0)
    restored.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    with pytest.raises(DfkdError, match="resume with the same tau"):
        FixedTau(8.0).load_state_dict(sampler.state_dict())


def test_stochastic_tau_in_range_and_varies_per_batch() -> None:
    sampler = StochasticTau(2.0, 20.0, seed=0)
    draws = [sampler.sample(64) for _ in range(200)]
    assert all(isinstance(d, float) and 2.0 <= d <= 20.0 for d in draws)
    assert len(set(draws)) == 200
    # A uniform draw over [2, 20] spreads across the range, not a narrow band.
    assert min(draws) < 4.0 and max(draws) > 18.0


def test_stochastic_tau_is_reproducible_from_the_seed() -> None:
    a, b, c = StochasticTau(2, 20, seed=7), StochasticTau(2, 20, seed=7), StochasticTau(2, 20, seed=8)
    seq_a = [a.sample(1) for _ in range(10)]
    assert seq_a == [b.sample(1) for _ in range(10)]
    assert seq_a != [c.sample(1) for _ in range(10)]


def test_stochastic_tau_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    StochasticTau(2, 20, seed=0).sample(8)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("per_sample", [False, True])
def test_stochastic_tau_resumes_the_same_sequence_after_a_json_round_trip(per_sample: bool) -> None:
    original = StochasticTau(2, 20, seed=3, per_sample=per_sample)
    for _ in range(5):
        original.sample(4)
    state = json.loads(json.dumps(original.state_dict()))
    expected = [original.sample(4) for _ in range(5)]

    resumed = StochasticTau(2, 20, seed=999, per_sample=per_sample)
    resumed.load_state_dict(state)
    got = [resumed.sample(4) for _ in range(5)]
    if per_sample:
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    else:
        assert got == expected


def test_stochastic_state_from_another_range_is_rejected() -> None:
    state = StochasticTau(2, 20, seed=0).state_dict()
    with pytest.raises(DfkdError, match="resume with the same tau"):
        StochasticTau(2, 10, seed=0).load_state_dict(state)
    with pytest.raises(DfkdError, match="resume with the same tau"):
        StochasticTau(2, 20, seed=0, per_sample=True).load_state_dict(state)


def test_per_sample_tau_shape_and_range() -> None:
    sampler = StochasticTau(2.0, 20.0, seed=1, per_sample=True)
    first, second = sampler.sample(256), sampler.sample(256)
    assert isinstance(first, torch.Tensor)
    assert first.shape == (256,) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert bool(((first >= 2.0) & (first <= 20.0)).all())
    assert first.unique().numel() > 250
    assert not torch.equal(first, second)


def test_stochastic_tau_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        StochasticTau(20, 2, seed=0)
    with pytest.raises(ValueError):
        StochasticTau(0.5, 2, seed=0)


def test_make_sampler() -> None:
    fixed = make_sampler(parse_tau("4"), (2.0, 20.0), seed=0, per_sample=False)
    assert isinstance(fixed, FixedTau) and fixed.sample(8) == 4.0
    stochastic = make_sampler(parse_tau("stochastic"), (3.0, 5.0), seed=0, per_sample=True)
    assert isinstance(stochastic, StochasticTau)
    assert (stochastic.low, stochastic.high, stochastic.per_sample) == (3.0, 5.0, True)
    with pytest.raises(DfkdError, match="per-sample tau needs stochastic tau"):
        make_sampler(parse_tau("4"), (2.0, 20.0), seed=0, per_sample=True)
    with pytest.raises(ValueError, match="FixedTau"):
        make_sampler(parse_tau("grid"), (2.0, 20.0), seed=0, per_sample=False)
