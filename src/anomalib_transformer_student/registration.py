"""Make TransformerStudent reachable through anomalib's model lookup (anomalib 2.7 has no plugin entry points).

``anomalib.models.get_model`` resolves a ``class_path`` without dots as an attribute of
``anomalib.models`` and only imports dotted paths from an allow-list of modules; the benchmark
pipeline builds its models this way. Registering the class in both places lets configs name it
``TransformerStudent`` or ``anomalib_transformer_student.TransformerStudent``.
"""

from __future__ import annotations

from importlib import import_module

from .lightning_model import TransformerStudent


def register_with_anomalib() -> None:
    """Expose ``TransformerStudent`` as ``anomalib.models.TransformerStudent`` and allow this package's path."""
    # Looked up in sys.modules: this may run while ``anomalib.models`` is still being bound to its parent.
    models = import_module("anomalib.models")
    models.TransformerStudent = TransformerStudent
    models.ALLOWED_MODULES.add(__package__)
