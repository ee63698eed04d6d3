"""Writing the defect-size robustness tables: console, CSV, Markdown and a PNG plot."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..metrics import FPR_LIMITS, SUBSETS


@dataclass
class CategoryResult:
    """One category's evaluation: the 4 x 4 size-AUPRO table and the usual anomalib metrics.

    Example:
        >>> result = CategoryResult("screw", torch.full((4, 4), 0.5), {"image_AUROC": 0.9})
        >>> result.robustness
        1.0
    """

    category: str
    table: torch.Tensor
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def robustness(self) -> float:
        """``AUPRO(Q1) / AUPRO(Q4)`` at FPR 0.30 (this package's summary figure, not the paper's)."""
        q1, q4 = float(self.table[0, 0]), float(self.table[-1, 0])
        return q1 / q4 if q4 > 0 else math.nan


def markdown_table(result: CategoryResult) -> str:
    """The 4 x 4 table of one category as Markdown (rows Q1..Q4, columns FPR limits)."""
    header = "| subset | " + " | ".join(f"AUPRO@{limit:.2f}" for limit in FPR_LIMITS) + " |"
    rule = "| --- |" + " --- |" * len(FPR_LIMITS)
    rows = [
        f"| {subset} | " + " | ".join(f"{float(value):.3f}" for value in result.table[index]) + " |"
        for index, subset in enumerate(SUBSETS)
    ]
    return "\n".join([header, rule, *rows])


def markdown_report(results: list[CategoryResult]) -> str:
    """All categories: their metrics line and their size table."""
    sections = ["# Defect-size robustness report", ""]
    sections.append(
        "Q1 holds the tiniest ground-truth regions (area <= 25th percentile of the category), Q2 <= median, "
        "Q3 <= 75th percentile, Q4 all; AUPRO at each FPR limit is normalised by the limit."
    )
    for result in results:
        metrics = ", ".join(f"{name} {value:.3f}" for name, value in result.metrics.items())
        sections += ["", f"## {result.category}", "", metrics, f"robustness Q1/Q4@0.30: {result.robustness:.3f}", ""]
        sections.append(markdown_table(result))
    return "\n".join(sections) + "\n"


def write_csv(results: list[CategoryResult], path: Path) -> None:
    """One row per category, subset and FPR limit, plus one row per scalar metric."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["category", "subset", "fpr_limit", "metric", "value"])
        for result in results:
            for row, subset in enumerate(SUBSETS):
                for column, limit in enumerate(FPR_LIMITS):
                    writer.writerow([result.category, subset, limit, "AUPRO", float(result.table[row, column])])
            for name, value in result.metrics.items():
                writer.writerow([result.category, "", "", name, value])
            writer.writerow([result.category, "", "", "robustness_Q1_over_Q4_at_0.30", result.robustness])


def plot(results: list[CategoryResult], path: Path) -> None:
    """AUPRO against defect-size subset, one line per FPR limit, one panel per category."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(results), figsize=(4 * len(results), 3.5), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        for column, limit in enumerate(FPR_LIMITS):
            axis.plot(SUBSETS, result.table[:, column].tolist(), marker="o", label=f"FPR {limit:.2f}")
        axis.set_title(result.category)
        axis.set_xlabel("defects up to size quartile")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalised AUPRO")
    axes[0][-1].legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def write_report(results: list[CategoryResult], output: Path) -> dict[str, Path]:
    """Write ``size_aupro.csv``, ``size_aupro.md`` and ``size_aupro.png`` into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"csv": output / "size_aupro.csv", "markdown": output / "size_aupro.md", "plot": output / "size_aupro.png"}
    write_csv(results, paths["csv"])
    paths["markdown"].write_text(markdown_report(results))
    plot(results, paths["plot"])
    return paths
