"""Make TransformerStudent reachable through anomalib's model lookup (anomalib 2.7 has no plugin entry points).

``anomalib.models.get_model`` resolves a ``class_path`` without dots as an attribute of
``anomalib.models`` and only imports dotted paths from an allow-list of modules; the benchmark
pipeline builds its models this way. Registering the class in both places lets configs name it
``TransformerStudent``, ``anomalib_transformer_student.TransformerStudent`` or
``anomalib_transformer_student.model.TransformerStudent``.

Registering also applies the package's one correction to anomalib's data loading: MVTec AD 2's samples
table under pandas 3 (see :mod:`~anomalib_transformer_student.training.mvtecad2_samples`).
"""

from __future__ import annotations

from importlib import import_module

from ..training.mvtecad2_samples import correct_mvtecad2_samples

PACKAGE = __package__.rpartition(".")[0]


def register_with_anomalib(model_class: type) -> None:
    """Expose ``model_class`` as an attribute of ``anomalib.models``, allow this package's paths, correct MVTec AD 2."""
    # Looked up in sys.modules: this may run while ``anomalib.models`` is still being bound to its parent.
    models = import_module("anomalib.models")
    setattr(models, model_class.__name__, model_class)
    models.ALLOWED_MODULES.update({PACKAGE, __package__})
    correct_mvtecad2_samples()
