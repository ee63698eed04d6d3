"""The demo dataset as an anomalib datamodule that never downloads (``configs/demo_data.yaml``).

anomalib's ``MVTecAD`` downloads the whole MVTec AD when its ``root`` holds no category folder; the demo's
generated dataset lives wherever ``transformer-student demo --data-root`` wrote it, so a relative root read from
another folder would start that download. :class:`DemoData` instead stops with a message that says where to look.
"""

from __future__ import annotations

from pathlib import Path

from anomalib.data import MVTecAD

DEFAULT_ROOT = Path("datasets/transformer_student_demo")  # `transformer-student demo`'s default --data-root


class DemoData(MVTecAD):
    """``MVTecAD`` over the demo's generated dataset (brick, grass, gravel); refuses to download anything.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     DemoData(root=folder).prepare_data()  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: No demo dataset at ...
    """

    def __init__(self, root: Path | str = DEFAULT_ROOT, category: str = "brick", **arguments: object) -> None:
        super().__init__(root=root, category=category, **arguments)

    def prepare_data(self) -> None:
        """Check that the generated category exists; never download."""
        folder = Path(self.root) / self.category
        if not folder.is_dir():
            msg = (
                f"No demo dataset at '{folder.resolve()}'. Generate it with `transformer-student demo` (or `make demo` "
                "in the repository), then pass the folder it wrote as --data.root (the demo's --data-root, by default "
                f"'{DEFAULT_ROOT}' under the folder the demo ran in). Nothing is downloaded."
            )
            raise FileNotFoundError(msg)
