"""Tests of the size-stratified AUPRO metric (known answers, anomalib and authors' parity, anomalib integration)."""

from bisect import bisect_right
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import Evaluator
from anomalib.metrics.aupro import _AUPRO
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from skimage.measure import label
from torch.utils.data import DataLoader

from anomalib_transformer_student.metrics.size_aupro import (
    FPR_LIMITS,
    ROBUSTNESS_KEY,
    TABLE_KEYS,
    SizeAUPRO,
    _SizeAUPRO,
    size_aupro_table,
    table_to_dict,
)

from ...factories import make_trainer

LIMITS = torch.tensor(FPR_LIMITS)


def found_fraction_value(found: int, total: int) -> torch.Tensor:
    """AUPRO per limit when ``found`` of ``total`` regions score 1 and the rest tie with background at 0.

    Found regions have PRO 1 from FPR 0; the tied ones follow the diagonal (PRO = FPR), whose normalised
    area up to a limit L is L / 2.
    """
    return (found + (total - found) * LIMITS / 2) / total


def anomalib_aupro(maps: torch.Tensor, masks: torch.Tensor, limit: float) -> float:
    metric = _AUPRO(fpr_limit=limit)
    metric.update(maps, masks.float())
    return float(metric.compute())


def reference_table(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Straight from the definition: one curve point per distinct score, regions via skimage."""
    background = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    regions = []
    for m, k in zip(maps, masks, strict=True):
        labels = label(k, connectivity=2)
        regions.extend(m[labels == r] for r in range(1, labels.max() + 1))
    areas = np.array([r.size for r in regions])
    bounds = [*np.percentile(areas, [25, 50, 75]), np.inf]
    thresholds = np.unique(maps)[::-1]
    fpr = np.array([0.0] + [np.mean(background >= t) for t in thresholds])
    pro_per_region = np.array([[0.0] + [np.mean(r >= t) for t in thresholds] for r in regions])
    table = np.empty((4, 4))
    for row, bound in enumerate(bounds):
        pro = pro_per_region[areas <= bound].mean(axis=0)
        for col, limit in enumerate(FPR_LIMITS):
            i = np.flatnonzero(fpr <= limit)[-1]
            xs, ys = list(fpr[: i + 1]), list(pro[: i + 1])
            if fpr[i] < limit:
                xs.append(limit)
                ys.append(pro[i] + (pro[i + 1] - pro[i]) * (limit - fpr[i]) / (fpr[i + 1] - fpr[i]))
            table[row, col] = np.trapezoid(ys, xs) / limit
    return table


def authors_reference_table(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The authors' ``calculate_au_pro`` transcribed loop by loop: 99 thresholds over the sorted background,
    rank FPR, overlap strictly above the threshold, the point (1, 1), their trapezoid with its correction."""
    background, regions = [], []
    for m, k in zip(maps, masks, strict=True):
        labels, count = ndimage.label(k, structure=np.ones((3, 3), dtype=int))
        background.extend(m[labels == 0])
        regions.extend(np.sort(m[labels == r]) for r in range(1, count + 1))
    background = np.sort(np.asarray(background, dtype=np.float64))
    areas = [r.size for r in regions]
    bounds = [np.quantile(areas, q) for q in (0.25, 0.5, 0.75)] + [max(areas)]
    positions = np.linspace(0, background.size - 1, num=99, dtype=int)
    table = np.empty((4, 4))
    for row, bound in enumerate(bounds):
        subset = [r for r in regions if 0 <= r.size <= bound]
        fprs, pros = [1.0], [1.0]
        for position in positions:
            threshold = background[position]
            fprs.append(1.0 - (position + 1) / background.size)
            pros.append(sum(1.0 - np.count_nonzero(r <= threshold) / r.size for r in subset) / len(subset))
        x, y = np.array(fprs[::-1]), np.array(pros[::-1])
        for col, limit in enumerate(FPR_LIMITS):
            correction = 0.0
            if limit not in x:
                i = bisect_right(x, limit)
                y_limit = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
                correction = 0.5 * (y_limit + y[i - 1]) * (limit - x[i - 1])
            xs, ys = x[x <= limit], y[x <= limit]
            table[row, col] = (np.sum(0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])) + correction) / limit
    return table


def blob_data(seed: int, n: int = 4, h: int = 48, w: int = 40, ties: bool = False):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 2, 2))
    masks = noise > np.quantile(noise, 0.9)
    maps = rng.random((n, h, w)).astype(np.float32) + 0.4 * masks * rng.random((n, h, w)).astype(np.float32)
    if ties:
        maps = np.round(maps * 8) / 8
    return torch.from_numpy(maps), torch.from_numpy(masks)


def two_region_masks() -> torch.Tensor:
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True  # 4 pixels
    masks[1, 10:20, 10:20] = True  # 100 pixels
    return masks


# known answers


def test_perfect_map_gives_one_everywhere() -> None:
    _, masks = blob_data(0)
    table = size_aupro_table(masks.float(), masks)
    torch.testing.assert_close(table, torch.ones(4, 4))
    assert table_to_dict(table)[ROBUSTNESS_KEY] == 1


def test_constant_map_gives_half_the_limit_as_anomalib() -> None:
    # all scores tie: a single threshold moves FPR and PRO together from (0, 0) to (1, 1), so the curve is
    # the diagonal and the normalised area up to L is L / 2 (anomalib's AUPRO gives the same)
    _, masks = blob_data(1)
    maps = torch.full(masks.shape, 0.25)
    table = size_aupro_table(maps, masks)
    torch.testing.assert_close(table, (LIMITS / 2).expand(4, 4))
    for col, limit in enumerate(FPR_LIMITS):
        assert anomalib_aupro(maps, masks, limit) == pytest.approx(float(table[3, col]), abs=1e-6)


def test_two_regions_only_the_large_one_found() -> None:
    # areas [4, 100]: p25 = 28, p50 = 52, p75 = 76, so Q1 = Q2 = Q3 = {small}, Q4 = {small, large}
    masks = two_region_masks()
    maps = torch.zeros(2, 32, 32)
    maps[1, 10:20, 10:20] = 1.0
    table = size_aupro_table(maps, masks)
    small_only = LIMITS / 2  # the small region ties with the background: diagonal
    both = 0.5 + LIMITS / 4  # mean of 1 (large) and the diagonal
    torch.testing.assert_close(table, torch.stack([small_only, small_only, small_only, both]))
    torch.testing.assert_close(table[:, 0], torch.tensor([0.15, 0.15, 0.15, 0.575]))
    assert float(table_to_dict(table)[ROBUSTNESS_KEY]) == pytest.approx(0.15 / 0.575, rel=1e-6)


def test_two_regions_small_one_scored_below_background() -> None:
    masks = two_region_masks()
    maps = torch.zeros(2, 32, 32)
    maps[1, 10:20, 10:20] = 1.0
    maps[0, 2:4, 2:4] = -1.0  # reached only at FPR 1
    table = size_aupro_table(maps, masks)
    expected = torch.zeros(4, 4)
    expected[3] = 0.5
    torch.testing.assert_close(table, expected)
    assert table_to_dict(table)[ROBUSTNESS_KEY] == 0


def test_four_regions_percentile_subsets() -> None:
    # areas [1, 4, 9, 100]: p25 = 3.25, p50 = 6.5, p75 = 31.75 -> Q1 {1}, Q2 {1, 4}, Q3 {1, 4, 9}, Q4 all
    masks = torch.zeros(1, 40, 40, dtype=torch.bool)
    masks[0, 1, 1] = True
    masks[0, 1:3, 5:7] = True
    masks[0, 1:4, 10:13] = True
    masks[0, 20:30, 20:30] = True
    maps = torch.zeros(1, 40, 40)
    maps[0, 1, 1] = 1.0
    maps[0, 20:30, 20:30] = 1.0  # the 1-pixel and the 100-pixel regions are found
    table = size_aupro_table(maps, masks)
    expected = torch.stack(
        [
            found_fraction_value(1, 1),
            found_fraction_value(1, 2),
            found_fraction_value(1, 3),
            found_fraction_value(2, 4),
        ]
    )
    torch.testing.assert_close(table, expected)


def test_regions_are_eight_connected() -> None:
    masks = torch.zeros(1, 20, 20, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True
    masks[0, 4:6, 4:6] = True  # touches the first square only diagonally: one region of 8 pixels
    masks[0, 10, 10:12] = True  # a separate 2-pixel region
    maps = torch.zeros(1, 20, 20)
    maps[0, 10, 10:12] = 1.0
    table = size_aupro_table(maps, masks)
    # 8-connectivity: areas [8, 2], Q1 = {2 px, found}; with 4-connectivity Q4 would be (1 + L) / 3
    torch.testing.assert_close(table[0], torch.ones(4))
    torch.testing.assert_close(table[3], found_fraction_value(1, 2))


# parity with anomalib and with the definition


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_matches_anomalib_aupro(seed: int, ties: bool) -> None:
    maps, masks = blob_data(seed, ties=ties)
    table = size_aupro_table(maps, masks)
    assert float(table[3, 0]) == pytest.approx(anomalib_aupro(maps, masks, 0.3), abs=1e-3)
    for col, limit in enumerate(FPR_LIMITS):
        assert float(table[3, col]) == pytest.approx(anomalib_aupro(maps, masks, limit), abs=1e-5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matches_definition_on_random_inputs(data: st.DataObject) -> None:
    shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(3, 10)), data.draw(st.integers(3, 10)))
    masks = data.draw(arrays(np.bool_, shape))
    assume(masks.any() and not masks.all())
    if data.draw(st.booleans()):
        maps = data.draw(arrays(np.int8, shape, elements=st.integers(0, 4))).astype(np.float32)
    else:
        maps = data.draw(arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    table = size_aupro_table(torch.from_numpy(maps), torch.from_numpy(masks))
    np.testing.assert_allclose(table.numpy(), reference_table(maps, masks), atol=1e-5)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_authors_curve_matches_their_algorithm(seed: int, ties: bool) -> None:
    maps, masks = blob_data(seed, ties=ties)
    table = size_aupro_table(maps, masks, curve="authors")
    np.testing.assert_allclose(table.numpy(), authors_reference_table(maps.numpy(), masks.numpy()), atol=1e-6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_authors_curve_matches_their_algorithm_on_random_inputs(data: st.DataObject) -> None:
    # small maps: fewer background pixels than thresholds, so positions repeat
    shape = (data.draw(st.integers(1, 3)), data.draw(st.integers(3, 10)), data.draw(st.integers(3, 10)))
    masks = data.draw(arrays(np.bool_, shape))
    assume(masks.any() and not masks.all())
    maps = data.draw(arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    table = size_aupro_table(torch.from_numpy(maps), torch.from_numpy(masks), curve="authors")
    np.testing.assert_allclose(table.numpy(), authors_reference_table(maps, masks), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_authors_curve_differs_slightly_from_the_exact_one(seed: int) -> None:
    maps, masks = blob_data(seed)  # continuous scores: no ties
    difference = (size_aupro_table(maps, masks, curve="authors") - size_aupro_table(maps, masks)).abs()
    assert 1e-4 < float(difference.max()) < 1e-2


def test_incremental_updates_equal_a_single_update() -> None:
    maps, masks = blob_data(3, n=6)
    metric = _SizeAUPRO()
    for i in range(0, 6, 2):
        metric.update(maps[i : i + 2], masks[i : i + 2])
    torch.testing.assert_close(metric.compute(), size_aupro_table(maps, masks))


def test_channel_dim_and_mask_dtypes() -> None:
    maps, masks = blob_data(4)
    expected = size_aupro_table(maps, masks)
    torch.testing.assert_close(size_aupro_table(maps.unsqueeze(1), masks), expected)
    torch.testing.assert_close(size_aupro_table(maps.unsqueeze(1), masks.unsqueeze(1).float()), expected)
    torch.testing.assert_close(size_aupro_table(maps, masks.to(torch.uint8)), expected)
    torch.testing.assert_close(size_aupro_table(maps[0], masks[0]), size_aupro_table(maps[:1], masks[:1]))


# degenerate inputs


def test_no_anomalous_region_gives_nan_with_warning() -> None:
    with pytest.warns(UserWarning, match="no anomalous region"):
        table = size_aupro_table(torch.rand(2, 16, 16), torch.zeros(2, 16, 16, dtype=torch.bool))
    assert table.isnan().all()
    assert table_to_dict(table)[ROBUSTNESS_KEY].isnan()


def test_no_background_gives_nan_with_warning() -> None:
    with pytest.warns(UserWarning, match="no anomaly-free pixel"):
        table = size_aupro_table(torch.rand(2, 16, 16), torch.ones(2, 16, 16, dtype=torch.bool))
    assert table.isnan().all()


def test_compute_without_update_gives_nan_with_warning() -> None:
    with pytest.warns(UserWarning, match="no data"):
        assert _SizeAUPRO().compute().isnan().all()


def test_regions_of_equal_size_fill_every_subset() -> None:
    masks = torch.zeros(1, 30, 30, dtype=torch.bool)
    for x in (1, 10, 20):
        masks[0, 5:8, x : x + 3] = True
    maps = torch.zeros(1, 30, 30)
    maps[0, 5:8, 1:4] = 1.0  # one of three 9-pixel regions found
    table = size_aupro_table(maps, masks)
    torch.testing.assert_close(table, found_fraction_value(1, 3).expand(4, 4))
    assert float(table_to_dict(table)[ROBUSTNESS_KEY]) == pytest.approx(1.0)


def test_single_region_fills_every_subset_and_matches_anomalib() -> None:
    masks = torch.zeros(2, 24, 24, dtype=torch.bool)
    masks[1, 3:9, 4:8] = True
    maps = torch.from_numpy(np.random.default_rng(5).random((2, 24, 24), dtype=np.float32))
    table = size_aupro_table(maps, masks)
    torch.testing.assert_close(table, table[3].expand(4, 4))
    assert float(table[3, 0]) == pytest.approx(anomalib_aupro(maps, masks, 0.3), abs=1e-6)
    assert float(table_to_dict(table)[ROBUSTNESS_KEY]) == pytest.approx(1.0)


def test_invalid_inputs_raise() -> None:
    masks = torch.zeros(1, 8, 8)
    masks[0, 2:4, 2:4] = 1
    maps = torch.rand(1, 8, 8)
    with pytest.raises(ValueError, match="do not match"):
        size_aupro_table(maps, masks[:, :6])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        size_aupro_table(maps, masks * 255)
    with pytest.raises(ValueError, match="shape"):
        size_aupro_table(maps.expand(1, 3, 8, 8), masks)
    maps[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        size_aupro_table(maps, masks)
    with pytest.raises(ValueError, match="NaN"):
        size_aupro_table(maps, torch.zeros_like(masks))
    with pytest.raises(ValueError, match="summary"):
        SizeAUPRO(summary="Q5_fpr0.30")
    with pytest.raises(ValueError, match="`curve` must be one of"):
        SizeAUPRO(curve="sampled")


# anomalib integration


def image_batches() -> list[ImageBatch]:
    masks = two_region_masks()
    maps = torch.zeros(2, 32, 32)
    maps[1, 10:20, 10:20] = 1.0
    return [ImageBatch(image=torch.rand(2, 3, 32, 32), anomaly_map=maps, gt_mask=masks) for _ in range(2)]


def test_anomalib_metric_reads_batch_fields() -> None:
    metric = SizeAUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_")
    assert metric.name == "pixel_SizeAUPRO"
    batch = image_batches()[0]
    metric.update(batch)
    # the Batch-like object may also carry (B, 1, H, W) maps
    metric.update(SimpleNamespace(anomaly_map=batch.anomaly_map.unsqueeze(1), gt_mask=batch.gt_mask))
    value = metric.compute()
    assert value.shape == ()
    assert float(value) == pytest.approx(0.15 / 0.575, rel=1e-6)
    values = metric.compute_dict()
    assert list(values) == [*TABLE_KEYS, ROBUSTNESS_KEY]
    assert float(values["Q4_fpr0.30"]) == pytest.approx(0.575)
    torch.testing.assert_close(metric.table()[:, 0], torch.tensor([0.15, 0.15, 0.575, 0.575]))

    with pytest.raises(ValueError, match="gt_mask"):
        SizeAUPRO().update(SimpleNamespace(anomaly_map=batch.anomaly_map, gt_mask=None))
    assert SizeAUPRO(strict=False).compute() is None


def test_summary_selects_the_computed_entry() -> None:
    metric = SizeAUPRO(summary="Q4_fpr0.10")
    for batch in image_batches():
        metric.update(batch)
    assert float(metric.compute()) == pytest.approx(0.525)
    assert float(metric.robustness()) == pytest.approx(0.15 / 0.575, rel=1e-6)


def test_table_is_recomputed_after_new_data() -> None:
    metric = SizeAUPRO()
    first, second = image_batches()
    metric.update(first)
    first_table = metric.table()
    metric.compute()
    torch.testing.assert_close(metric.table(), first_table)
    metric.update(second)  # areas [4, 100, 4, 100]: p75 = 100, so Q3 now holds the large regions
    assert float(metric.table()[2, 0]) == pytest.approx(0.575)


class _TinyModule(pl.LightningModule):
    def __init__(self, evaluator: Evaluator) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def test_step(self, batch: ImageBatch, batch_idx: int) -> None:
        del batch, batch_idx

    def configure_callbacks(self) -> list[Evaluator]:
        return [self.evaluator]


def test_logged_by_evaluator_in_lightning_test_loop() -> None:
    robustness = SizeAUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_")
    q1 = SizeAUPRO(prefix="pixel_q1_", summary="Q1_fpr0.30")
    trainer = make_trainer()
    loader = DataLoader(image_batches(), batch_size=None, collate_fn=lambda batch: batch)
    (results,) = trainer.test(_TinyModule(Evaluator(test_metrics=[robustness, q1])), loader, verbose=False)
    assert results["pixel_SizeAUPRO"] == pytest.approx(0.15 / 0.575, rel=1e-6)
    assert results["pixel_q1_SizeAUPRO"] == pytest.approx(0.15)
    # Lightning resets logged metrics after the epoch; the last table stays available for reports
    assert robustness.last_table is not None
    torch.testing.assert_close(robustness.last_table[:, 0], torch.tensor([0.15, 0.15, 0.575, 0.575]))


def test_evaluator_from_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--evaluator", type=Evaluator)
    config = parser.parse_string(
        """
        evaluator:
          class_path: anomalib.metrics.Evaluator
          init_args:
            test_metrics:
              - class_path: anomalib_transformer_student.metrics.SizeAUPRO
                init_args:
                  fields: [anomaly_map, gt_mask]
                  prefix: pixel_
                  summary: Q1_fpr0.30
                  curve: authors
        """
    )
    evaluator = parser.instantiate_classes(config).evaluator
    (metric,) = evaluator.test_metrics
    assert isinstance(metric, SizeAUPRO)
    assert (metric.name, metric.summary, metric.curve) == ("pixel_SizeAUPRO", "Q1_fpr0.30", "authors")
