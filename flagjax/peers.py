"""Access to peer libraries for parity tests and benchmarks (optional extra ``flagjax[byzfl]``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["byzfl_module"]


def byzfl_module(name: str = "aggregators"):
    """Import ``byzfl.<name>`` without running ``byzfl/__init__.py``.

    byzfl's package ``__init__`` imports torchvision, which cannot load next to the CPU torch wheel
    used here; its ``aggregators`` and ``attacks`` modules do not need it. A bare package module with
    the right ``__path__`` is put into ``sys.modules`` first (docs/jax_traps.md).
    """
    if "byzfl" not in sys.modules or not hasattr(sys.modules["byzfl"], "__path__"):
        spec = importlib.util.find_spec("byzfl")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("byzfl is not installed: pip install 'flagjax[byzfl]'")
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = pkg
    return importlib.import_module(f"byzfl.{name}")
