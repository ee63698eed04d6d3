"""Writing results: metrics as JSON, a console table, and a PNG grid of images, masks and anomaly maps.

Nothing here knows about training; the functions take plain numbers and arrays, so any job
(the demo, an evaluation, a benchmark) can write the same kind of report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

GRID_ROWS = ("image", "ground truth", "anomaly map")


@dataclass(frozen=True)
class GridSample:
    """One column of the prediction grid.

    Args:
        image: RGB image ``(H, W, 3)`` with values in ``[0, 1]``.
        gt_mask: Ground-truth mask ``(H, W)``; all zeros for a good sample.
        anomaly_map: Anomaly map ``(H, W)`` normalised for display: ``[0, 1]``, 0.5 at the threshold.
        score: Normalised image score (0.5 at the threshold).
        title: Caption above the image, e.g. the defect type and file name.

    Example:
        >>> sample = GridSample(np.zeros((8, 8, 3)), np.zeros((8, 8)), np.zeros((8, 8)), 0.1, "good/000")
        >>> sample.verdict
        'good'
    """

    image: np.ndarray
    gt_mask: np.ndarray
    anomaly_map: np.ndarray
    score: float
    title: str

    @property
    def verdict(self) -> str:
        """``'anomalous'`` when the normalised score reaches the threshold 0.5, else ``'good'``."""
        return "anomalous" if self.score >= 0.5 else "good"


def _json_ready(value: Any) -> Any:
    """Plain JSON types; non-finite floats become ``null`` (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(payload: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``payload`` as indented JSON (scalars of numpy/torch converted, NaN as ``null``).

    Example:
        >>> import tempfile
        >>> path = write_metrics_json({"image_AUROC": 0.9}, Path(tempfile.mkdtemp()) / "metrics.json")
        >>> json.loads(path.read_text())
        {'image_AUROC': 0.9}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_ready(payload), indent=2, allow_nan=False) + "\n")
    return path


def format_metrics_table(rows: Mapping[str, Mapping[str, float | None]], columns: Sequence[str]) -> str:
    """Format a fixed-width text table: one row per key of ``rows``, one column per metric name.

    Example:
        >>> print(format_metrics_table({"brick": {"image_AUROC": 0.9}}, ["image_AUROC"]))
        category  image_AUROC
        brick           0.900
    """
    width = max([len("category"), *(len(name) for name in rows)])
    header = "  ".join(["category".ljust(width), *columns])
    lines = [header]
    for name, metrics in rows.items():
        cells = []
        for column in columns:
            value = metrics.get(column)
            text = "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
            cells.append(text.rjust(len(column)))
        lines.append("  ".join([name.ljust(width), *cells]))
    return "\n".join(lines)


def save_prediction_grid(
    groups: Mapping[str, Sequence[GridSample]],
    path: str | Path,
    title: str,
    panel_inches: float = 2.2,
) -> Path:
    """Save a grid with one band of three rows (image, ground truth, anomaly map) per group.

    Each sample is a column of its group's band; the anomaly map is drawn over the image with a
    fixed colour scale (0 to 1, threshold at 0.5), so maps of different samples compare, and the
    ground-truth outline is drawn on it in white.

    Args:
        groups: Samples per group, in display order; the key is the band's heading (e.g. the
            category and its scores).
        path: Where to write the PNG.
        title: Figure title (several lines allowed).
        panel_inches: Size of one panel.

    Returns:
        ``path``.

    Raises:
        ValueError: If there is no sample to draw.
    """
    columns = max((len(samples) for samples in groups.values()), default=0)
    if columns == 0:
        msg = "save_prediction_grid needs at least one sample; every group is empty."
        raise ValueError(msg)
    band_inches = panel_inches * len(GRID_ROWS) + 0.6
    title_inches = 0.2 * (title.count("\n") + 1) + 0.2
    figure = Figure(
        figsize=(panel_inches * columns + 1.2, band_inches * len(groups) + title_inches),
        dpi=100,
        layout="constrained",
    )
    bands = figure.subfigures(len(groups), 1, squeeze=False)[:, 0]
    for band, (heading, samples) in zip(bands, groups.items(), strict=True):
        axes = band.subplots(len(GRID_ROWS), columns, squeeze=False)
        heat = None
        for column, (image_axis, mask_axis, map_axis) in enumerate(axes.T):
            for axis in (image_axis, mask_axis, map_axis):
                axis.set_xticks([])
                axis.set_yticks([])
            if column >= len(samples):
                for axis in (image_axis, mask_axis, map_axis):
                    axis.set_axis_off()
                continue
            sample = samples[column]
            image_axis.imshow(sample.image.clip(0, 1))
            image_axis.set_title(f"{sample.title}\nscore {sample.score:.2f} ({sample.verdict})", fontsize=8)
            mask_axis.imshow(sample.gt_mask, cmap="gray", vmin=0, vmax=1)
            map_axis.imshow(sample.image.clip(0, 1))
            heat = map_axis.imshow(sample.anomaly_map.clip(0, 1), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if sample.gt_mask.any():
                map_axis.contour(sample.gt_mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
        for axis, name in zip(axes[:, 0], GRID_ROWS, strict=True):
            axis.set_ylabel(name, fontsize=9)
        if heat is not None:
            colorbar = band.colorbar(heat, ax=axes[-1, :], shrink=0.9)
            colorbar.set_label("anomaly\n(0.5 = threshold)", fontsize=8)
        band.suptitle(heading, fontsize=10, fontweight="bold")
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
