"""MVTec AD 2 loads under pandas 3: good images' missing mask paths become ``""``, not NaN.

anomalib 2.7 builds MVTec AD 2's samples table (``make_mvtec2_dataset`` in
``anomalib/data/datasets/image/mvtecad2.py``) from tuples whose ``mask_path`` is ``None`` for good and
private-test images. pandas 3 stores such a column as strings and turns ``None`` into NaN, a float, so
reading any of those images fails in anomalib's path check with ``TypeError: Path must be None, a
string, or Path object, got <class 'float'>`` (train, validation, and the good images of every test set).

:func:`correct_mvtecad2_samples` wraps that one function so that its table holds ``""`` where no mask
exists, as anomalib's own ``MVTecAD`` and ``Folder`` tables do (anomalib reads ``""`` as "no mask"). It
changes nothing else, is a no-op for tables without missing mask paths, and runs when the model is
imported (so for ``anomalib train --model TransformerStudent --data anomalib.data.MVTecAD2`` and for
``from anomalib_transformer_student import TransformerStudent``), whatever the pandas version.

Example:
    >>> from anomalib.data.datasets.image import mvtecad2
    >>> correct_mvtecad2_samples()
    >>> mvtecad2.make_mvtec2_dataset.__wrapped__.__name__
    'make_mvtec2_dataset'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import import_module
from typing import Any

# The anomalib module that builds MVTec AD 2's samples, and its function.
MODULE = "anomalib.data.datasets.image.mvtecad2"
FUNCTION = "make_mvtec2_dataset"
# Marks the wrapper, so that correcting twice wraps once.
_MARK = "_fills_missing_mask_paths"


def fill_missing_mask_paths(samples: Any) -> Any:
    """``samples`` (an anomalib samples ``DataFrame``) with missing ``mask_path`` entries set to ``""``.

    The table's ``attrs`` (anomalib keeps the task there) are kept.

    Example:
        >>> import pandas as pd
        >>> table = pd.DataFrame({"image_path": ["a.png", "b.png"], "mask_path": [None, "b_mask.png"]})
        >>> fill_missing_mask_paths(table)["mask_path"].tolist()
        ['', 'b_mask.png']
    """
    if "mask_path" in samples and bool(samples["mask_path"].isna().any()):
        attrs = dict(samples.attrs)
        samples = samples.assign(mask_path=samples["mask_path"].fillna(""))
        samples.attrs.update(attrs)
    return samples


def correct_mvtecad2_samples() -> None:
    """Make anomalib's MVTec AD 2 samples table hold ``""`` instead of NaN for missing masks (idempotent)."""
    module = import_module(MODULE)
    original: Callable[..., Any] | None = getattr(module, FUNCTION, None)
    if original is None or getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def make_samples(*args: Any, **kwargs: Any) -> Any:
        return fill_missing_mask_paths(original(*args, **kwargs))

    setattr(make_samples, _MARK, True)
    setattr(module, FUNCTION, make_samples)


__all__ = ["correct_mvtecad2_samples", "fill_missing_mask_paths"]
