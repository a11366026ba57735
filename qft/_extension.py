"""Loading the optional CUDA extension ``qft._C`` and saying why it is unusable when it is."""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class ExtensionStatus:
    """What is known about ``qft._C``: built, importable, and how many GPUs it sees."""

    module: ModuleType | None
    error: str  # why it did not import ("" if it did)
    device_count: int
    device_status: str  # why it sees no GPU ("" if it sees one)

    @property
    def usable(self) -> bool:
        """True when the extension imported and can launch on at least one GPU."""
        return self.module is not None and self.device_count > 0


@functools.lru_cache(maxsize=1)
def extension() -> ExtensionStatus:
    """Import ``qft._C`` once; never raises (a missing or broken build is reported, not fatal)."""
    try:
        module = importlib.import_module("qft._C")
    except ImportError as exc:
        return ExtensionStatus(None, str(exc), 0, "extension not loaded")
    count = module.device_count()
    return ExtensionStatus(module, "", count, module.device_status())
