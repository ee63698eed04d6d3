"""Register TransformerStudent with anomalib the moment anomalib's model registry is imported.

anomalib finds models among the imported subclasses of ``AnomalibModule``, so the short name
``--model TransformerStudent`` works only if this package is imported before the CLI parses
its arguments. A ``.pth`` line imports this tiny module at interpreter start; it imports
nothing heavy itself and only waits for ``anomalib.models`` to be imported.
"""

import sys

_TRIGGER = "anomalib.models"
_PLUGIN = "anomalib_transformer_student.model"


class _ImportPluginAfterAnomalibModels:
    """Meta-path finder that imports the plugin right after ``anomalib.models`` has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module_then_plugin(module) -> None:
            execute(module)
            try:
                __import__(_PLUGIN)
            except Exception as error:  # anomalib must keep working even if the plugin is broken
                import warnings

                warnings.warn(f"{_PLUGIN} could not be registered with anomalib: {error!r}", stacklevel=2)

        spec.loader.exec_module = exec_module_then_plugin
        return spec


def install() -> None:
    """Watch for ``anomalib.models`` unless it is already imported (then import the plugin now)."""
    if _TRIGGER in sys.modules:
        __import__(_PLUGIN)
    elif not any(isinstance(finder, _ImportPluginAfterAnomalibModels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ImportPluginAfterAnomalibModels())


install()
