"""Evaluation metrics: defect-size robustness of AUPRO (``SizeAUPRO``) and the evaluator using it."""

from .evaluator import SizeEvaluator
from .size_aupro import (
    CURVES,
    FPR_LIMITS,
    ROBUSTNESS_KEY,
    SIZE_PERCENTILES,
    SUBSETS,
    TABLE_KEYS,
    Curve,
    SizeAUPRO,
    size_aupro_table,
    table_to_dict,
)

__all__ = [
    "CURVES",
    "FPR_LIMITS",
    "ROBUSTNESS_KEY",
    "SIZE_PERCENTILES",
    "SUBSETS",
    "TABLE_KEYS",
    "Curve",
    "SizeAUPRO",
    "SizeEvaluator",
    "size_aupro_table",
    "table_to_dict",
]
