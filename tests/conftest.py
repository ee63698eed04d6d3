"""Shared fixtures: a tiny generated MVTec-AD-layout dataset and a model trained on it once per session.

Helpers live in ``tests/helpers.py``, factories (model, engine, datamodule, counters) in ``tests/factories.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from anomalib_transformer_student.apps.demo_data import DemoDatasetSpec, generate_demo_dataset

if TYPE_CHECKING:
    from .factories import Trained


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tests' default teacher-feature cache in a folder of their own, never the user's ``~/.cache``.

    Subprocesses the tests start inherit it.
    """
    patch = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("xdg_cache")
    patch.setenv("XDG_CACHE_HOME", str(home))
    yield home
    patch.undo()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One category ('brick') of 112-px images: 8 train, 3 good and 6 defective test images."""
    root = tmp_path_factory.mktemp("demo_data")
    spec = DemoDatasetSpec(categories=("brick",), image_size=112, n_train=8, n_test_good=3, n_test_per_defect=2)
    return generate_demo_dataset(root, spec)


@pytest.fixture(scope="session")
def trained_small(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The small model (random ViT-S/14 teacher, 112 px) fitted two epochs on ``demo_root``, once per session.

    For tests that only read a trained model (test, predict, reload, evaluate its checkpoint); a test that
    changes the model or its checkpoint trains its own.
    """
    from .factories import train_small  # torch and anomalib load only for the tests that use it

    return train_small(demo_root, tmp_path_factory.mktemp("trained_small"))
