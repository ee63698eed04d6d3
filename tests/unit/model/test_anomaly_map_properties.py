"""Invariants of the anomaly-map and scoring code over random shapes, settings and values (hypothesis)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.nn import functional

from anomalib_transformer_student.model.anomaly_map import (
    AnomalyMapGenerator,
    box_blur_1d,
    square_padding,
    top_k_mean,
)

SETTINGS = settings(max_examples=40, deadline=None)
# Finite float32 values from tiny to huge (squares of the largest overflow: normalisation must cope).
LIMIT = float(np.float32(1e30))
VALUES = st.floats(-LIMIT, LIMIT, width=32)


@st.composite
def map_problems(draw: st.DrawFn) -> dict:
    """Random tokens, patch grid, output size and smoothing settings."""
    batch, rows, columns, width = (draw(st.integers(1, n)) for n in (3, 6, 6, 5))
    stages = draw(st.integers(1, 2))
    shape = (4, batch, rows * columns, width)
    tokens = draw(hnp.arrays(np.float32, shape, elements=VALUES))
    return {
        "tokens": torch.from_numpy(tokens),
        "grid": (rows, columns),
        "output_size": (draw(st.integers(1, 40)), draw(st.integers(1, 40))),
        "kernels": draw(st.lists(st.sampled_from([1, 3, 5, 7]), min_size=stages, max_size=stages)),
        "repeats": draw(st.lists(st.integers(0, 3), min_size=stages, max_size=stages)),
        "topk_ratio": draw(st.floats(1e-4, 1.0)),
    }


def _run(problem: dict, tokens: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    generator = AnomalyMapGenerator(problem["kernels"], problem["repeats"], problem["topk_ratio"])
    shallow, deep, predicted_shallow, predicted_deep = problem["tokens"] if tokens is None else tokens
    return generator(
        shallow,
        deep,
        predicted_shallow,
        predicted_deep,
        problem["grid"],
        kwargs.pop("output_size", problem["output_size"]),
        **kwargs,
    )


@SETTINGS
@given(map_problems())
def test_map_has_requested_size_and_finite_non_negative_bounded_values(problem: dict) -> None:
    anomaly_map, scores = _run(problem)
    batch = problem["tokens"].shape[1]
    assert anomaly_map.shape == (batch, 1, *problem["output_size"])
    assert scores.shape == (batch,)
    assert torch.isfinite(anomaly_map).all() and torch.isfinite(scores).all()
    # Each patch score is a product of two distances between unit vectors (each in [0, 2]); bilinear
    # weights sum to 1 and zero-padded box filters to at most 1, so the map stays within [0, 4].
    assert (anomaly_map >= 0).all() and (anomaly_map <= 4 + 1e-4).all()
    assert (scores >= 0).all()
    assert (scores <= anomaly_map.flatten(1).max(dim=1).values + 1e-5).all()


@SETTINGS
@given(map_problems(), st.randoms(use_true_random=False))
def test_scores_follow_a_permutation_of_the_batch(problem: dict, rng) -> None:
    batch = problem["tokens"].shape[1]
    order = list(range(batch))
    rng.shuffle(order)
    anomaly_map, scores = _run(problem)
    permuted_map, permuted_scores = _run(problem, problem["tokens"][:, order])
    torch.testing.assert_close(permuted_scores, scores[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted_map, anomaly_map[order], rtol=1e-5, atol=1e-6)


@SETTINGS
@given(map_problems(), st.integers(1, 40), st.integers(1, 40))
def test_original_size_window_is_the_crop_of_the_padded_square_map(problem: dict, height: int, width: int) -> None:
    """The full-resolution map equals upsampling to the padded square and cropping the padding away."""
    side, top, left = square_padding((height, width))
    full, _ = _run(problem, output_size=(side, side))
    window, scores = _run(problem, output_size=(side, side), original_size=(height, width))
    assert window.shape[-2:] == (height, width)
    torch.testing.assert_close(window, full[..., top : top + height, left : left + width], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, top_k_mean(window, problem["topk_ratio"]))


@SETTINGS
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 60)), elements=st.floats(-1e3, 1e3, width=32)),
    st.sampled_from([1, 3, 5, 7, 9]),
)
def test_box_blur_is_a_zero_padded_mean_filter(signals: np.ndarray, kernel_size: int) -> None:
    signals = torch.from_numpy(signals)
    expected = functional.avg_pool1d(
        signals[:, None], kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True
    )[:, 0]
    blurred = box_blur_1d(signals, kernel_size)
    assert blurred.shape == signals.shape
    torch.testing.assert_close(blurred, expected, rtol=1e-5, atol=1e-3)


@SETTINGS
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.just(1), st.integers(1, 20), st.integers(1, 20)),
        elements=st.floats(0, 1e6, width=32),
    ),
    st.floats(1e-4, 1.0),
)
def test_top_k_mean_lies_between_mean_and_max_and_matches_its_definition(maps: np.ndarray, ratio: float) -> None:
    maps = torch.from_numpy(maps)
    scores = top_k_mean(maps, ratio)
    flat = maps.flatten(1).double()
    k = max(1, int(ratio * flat.shape[1]))
    expected = flat.sort(dim=1, descending=True).values[:, :k].mean(dim=1)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-3)
    assert (scores.double() <= flat.max(dim=1).values * (1 + 1e-6)).all()
    assert (scores.double() >= flat.mean(dim=1) * (1 - 1e-5) - 1e-3).all()
