"""The paper's 50 epochs replace only Lightning's default epoch count; other batch sizes than 4 are noted."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from anomalib_transformer_student.training.schedule import PAPER_EPOCHS, apply_paper_epochs, note_batch_size


def _trainer(max_epochs: int, max_steps: int = -1) -> SimpleNamespace:
    return SimpleNamespace(fit_loop=SimpleNamespace(max_epochs=max_epochs), max_steps=max_steps)


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "expected"),
    [(1000, -1, PAPER_EPOCHS), (3, -1, 3), (1000, 200, 1000), (-1, -1, -1)],
    ids=["lightning-default", "user-epochs", "user-steps", "unlimited"],
)
def test_only_lightnings_default_becomes_the_papers(max_epochs: int, max_steps: int, expected: int) -> None:
    trainer = _trainer(max_epochs, max_steps)
    assert apply_paper_epochs(trainer) == (expected != max_epochs)
    assert trainer.fit_loop.max_epochs == expected


def test_batch_size_other_than_the_papers_is_noted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        note_batch_size(4)
        assert not caplog.records
        note_batch_size(32)
    assert "Training batch size is 32; the paper trains with 4" in caplog.text
