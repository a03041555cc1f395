"""Choosing tokens on the host (models/sampling.py): the same tokens as the reference sampler (the
chatbot guest's before the host chose them) for the same seed, and the bounds of each parameter in
pairs, obeyed and violated, on the host and in the guest SDK (the same bounds on both sides)."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest

import sampling_reference as ref
from wasminfer.errors import InvalidSampling
from wasminfer.locations import guest_sdk_path
from wasminfer.models.sampling import FRAME, MAX_TEMPERATURE, MAX_TOP_K, Sampler, Sampling

SETTINGS = [
    {},
    {"temperature": 0.9, "seed": 7},
    {"temperature": 1.3, "top_k": 10, "seed": 123},
    {"temperature": 0.7, "top_p": 0.8, "seed": 99},
    {"temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 2**40 + 5},
    {"temperature": 100.0, "top_k": MAX_TOP_K, "seed": 2**64 - 1},
]


@pytest.fixture(scope="module")
def sdk() -> Iterator[ModuleType]:
    path = str(guest_sdk_path() / "python")
    sys.path.insert(0, path)
    try:
        import wasminfer_guest.decoder as decoder

        yield decoder
    finally:
        sys.path.remove(path)


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_host_draws_the_reference_samplers_tokens_for_the_same_seed(settings: dict[str, float]) -> None:
    rows = np.random.default_rng(5).normal(0, 3, (300, 96)).astype(np.float32)
    host = Sampler(Sampling(**settings))  # type: ignore[arg-type]
    s, rng = ref.Sampling(**settings), ref.Rng(int(settings.get("seed", 0)))  # type: ignore[arg-type]
    mine = [host.next(row) for row in rows]
    assert mine == [ref.choose(row, s, rng) for row in rows]
    if settings.get("temperature"):
        assert len(set(mine)) > 10  # sampled, not one token over and over


def test_greedy_is_the_argmax_and_draws_no_number() -> None:
    sampler = Sampler(Sampling(seed=3))
    row = np.array([0.1, 2.5, -1.0, 2.4], np.float32)
    assert [sampler.next(row) for _ in range(3)] == [1, 1, 1]
    assert sampler.rng.state == 3


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    sampler = Sampler(Sampling(temperature=50.0, top_k=1, seed=9))
    rows = np.random.default_rng(1).normal(size=(50, 96)).astype(np.float32)
    assert [sampler.next(r) for r in rows] == [int(np.argmax(r)) for r in rows]


@pytest.mark.parametrize(("settings", "message"), [
    ({"temperature": -0.1}, "temperature is 0 (greedy) to 100, not -0.1"),
    ({"temperature": MAX_TEMPERATURE * 1.01}, "temperature is 0 (greedy) to 100, not 101.0"),
    ({"temperature": math.nan}, "temperature is 0 (greedy) to 100, not nan"),
    ({"temperature": math.inf}, "temperature is 0 (greedy) to 100, not inf"),
    ({"top_k": -1}, "top_k is 0 (all tokens) to 1048576, not -1"),
    ({"top_k": MAX_TOP_K + 1}, "top_k is 0 (all tokens) to 1048576, not 1048577"),
    ({"top_p": 0.0}, "top_p is over 0 and at most 1, not 0.0"),
    ({"top_p": 1.01}, "top_p is over 0 and at most 1, not 1.01"),
    ({"seed": -1}, "seed is 0 to 2**64 - 1, not -1"),
    ({"seed": 2**64}, "seed is 0 to 2**64 - 1, not 18446744073709551616"),
])  # fmt: skip
def test_bounds_violated_are_refused_naming_the_parameter(
    settings: dict[str, float], message: str, sdk: ModuleType
) -> None:
    with pytest.raises(InvalidSampling, match=re.escape(f"sampling: {message}")) as caught:
        Sampling(**settings)  # type: ignore[arg-type]
    assert caught.value.status == 400 and caught.value.code == "invalid_sampling"
    with pytest.raises(ValueError, match=re.escape(message)):
        sdk.Sampling(**settings)


def test_bounds_obeyed_at_their_edges_on_both_sides(sdk: ModuleType) -> None:
    edges = {"temperature": MAX_TEMPERATURE, "top_k": MAX_TOP_K, "top_p": 1.0, "seed": 2**64 - 1}
    host, guest = Sampling(**edges), sdk.Sampling(**edges)  # type: ignore[arg-type]
    assert Sampling.unpack(guest.frame()) == host
    assert Sampling.unpack(sdk.Sampling(top_p=1e-9).frame()) == Sampling(top_p=1e-9)
    assert (sdk.MAX_TEMPERATURE, sdk.MAX_TOP_K) == (MAX_TEMPERATURE, MAX_TOP_K)


def test_a_frame_past_the_bounds_is_refused_by_the_host() -> None:
    """A guest may write its frames itself: the host checks them again."""
    with pytest.raises(InvalidSampling, match="top_k is 0 .* not 4294967295"):
        Sampling.unpack(FRAME.pack(1.0, 2**32 - 1, 1.0, 0))
    with pytest.raises(InvalidSampling, match="temperature .* not nan"):
        Sampling.unpack(FRAME.pack(math.nan, 0, 1.0, 0))
    with pytest.raises(InvalidSampling, match="a frame of 28 bytes, not 27"):
        Sampling.unpack(FRAME.pack(1.0, 0, 1.0, 0)[:-1])


def test_the_sdk_reads_sampling_from_a_request(sdk: ModuleType) -> None:
    s = sdk.Sampling.from_dict({"temperature": 0.5, "top_k": 20.0, "seed": 7, "prompt": "x"})
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.5, 20, 1.0, 7)
    with pytest.raises(ValueError, match="2.5 is not a whole number"):
        sdk.Sampling.from_dict({"top_k": 2.5})
    with pytest.raises(ValueError, match="could not convert string to float"):
        sdk.Sampling.from_dict({"temperature": "hot"})
