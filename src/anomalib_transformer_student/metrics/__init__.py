"""Evaluation metrics: defect-size robustness of AUPRO (``SizeAUPRO``)."""

from .size_aupro import (
    FPR_LIMITS,
    ROBUSTNESS_KEY,
    SIZE_PERCENTILES,
    SUBSETS,
    TABLE_KEYS,
    SizeAUPRO,
    size_aupro_table,
    table_to_dict,
)

__all__ = [
    "FPR_LIMITS",
    "ROBUSTNESS_KEY",
    "SIZE_PERCENTILES",
    "SUBSETS",
    "TABLE_KEYS",
    "SizeAUPRO",
    "size_aupro_table",
    "table_to_dict",
]
