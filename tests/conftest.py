"""Shared fixtures: a tiny generated MVTec-AD-layout dataset (helpers live in ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One category ('brick') of 112-px images: 8 train, 3 good and 6 defective test images."""
    root = tmp_path_factory.mktemp("demo_data")
    spec = DemoDatasetSpec(categories=("brick",), image_size=112, n_train=8, n_test_good=3, n_test_per_defect=2)
    return generate_demo_dataset(root, spec)
