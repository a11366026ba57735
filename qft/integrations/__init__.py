"""Backends for other libraries: ``qft.integrations.transformers`` (a quantizer for
``from_pretrained``), ``qft.integrations.peft`` (qft's fused layers inside PEFT models).

Importing transformers costs seconds, so ``import qft`` does not; instead it registers qft's quantizer
the moment transformers loads its quantizer table (``install_transformers_hook``), so a checkpoint
saved with ``QftConfig`` loads with plain ``from_pretrained`` after ``import qft``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_TRIGGER = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from qft.integrations import transformers as _  # noqa: F401  (importing registers)
    except Exception as exc:  # an incompatible transformers must not break import of qft or of transformers
        warnings.warn(f"qft could not register its transformers quantizer: {exc}", RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers.quantizers.auto`` so qft registers right after it runs."""

    def find_spec(self, name, path=None, target=None):
        if name != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # once, and not for the lookup below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_and_register(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def install_transformers_hook() -> None:
    """Register qft's quantizer with transformers now if its quantizer table is loaded, else as soon as it is."""
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
