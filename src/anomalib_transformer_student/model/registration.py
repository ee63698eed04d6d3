"""Make TransformerStudent reachable through anomalib's model lookup (anomalib 2.7 has no plugin entry points).

``anomalib.models.get_model`` resolves a ``class_path`` without dots as an attribute of
``anomalib.models`` and only imports dotted paths from an allow-list of modules; the benchmark
pipeline builds its models this way. Registering the class in both places lets configs name it
``TransformerStudent``, ``anomalib_transformer_student.TransformerStudent`` or
``anomalib_transformer_student.model.TransformerStudent``.
"""

from __future__ import annotations

from importlib import import_module

PACKAGE = __package__.rpartition(".")[0]


def register_with_anomalib(model_class: type) -> None:
    """Expose ``model_class`` as an attribute of ``anomalib.models`` and allow this package's paths."""
    # Looked up in sys.modules: this may run while ``anomalib.models`` is still being bound to its parent.
    models = import_module("anomalib.models")
    setattr(models, model_class.__name__, model_class)
    models.ALLOWED_MODULES.update({PACKAGE, __package__})
