"""Loading the optional extensions (``qft._C``, CUDA; ``qft._cpu``, CPU) and saying why one is unusable
when it is."""

from __future__ import annotations

import functools
import importlib
import os
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


@dataclass(frozen=True)
class CpuExtensionStatus:
    """What is known about ``qft._cpu``: the module when it imported and is switched on, else why not."""

    module: ModuleType | None
    error: str  # why it is not used ("" if it is)
    threads: str = ""  # how its calls are threaded, when it is used

    @property
    def usable(self) -> bool:
        """True when the CPU kernels imported and are not switched off (``QFT_CPU_KERNELS=0``)."""
        return self.module is not None


_OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")


def _openmp_runtimes() -> set[str] | None:
    """The OpenMP runtime libraries mapped into this process (real paths), or None where that cannot be
    read (no /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return None
    return {os.path.realpath(p) for p in paths if os.path.basename(p).startswith(_OPENMP_RUNTIMES)}


def _share_torchs_threads(module: ModuleType) -> str:
    """Let ``qft._cpu`` split calls over OpenMP's threads only where its runtime is the process's one
    (torch's, which torch loads first); beside a second runtime (a torch wheel whose libgomp carries
    another file name), two teams of threads would spin on the same cores, so every call runs on one
    thread. Returns how its calls are threaded."""
    if not module.built_with_openmp():
        return "one thread (built without OpenMP)"
    ours = module.openmp_library()
    runtimes = _openmp_runtimes()
    if ours and runtimes == {os.path.realpath(ours)}:
        module.set_openmp_enabled(True)
        return f"OpenMP threads of {ours}"
    module.set_openmp_enabled(False)
    found = "unknown" if runtimes is None else ", ".join(sorted(runtimes)) or "none"
    return f"one thread (OpenMP runtimes in the process: {found}; its own: {ours or 'unknown'})"


@functools.lru_cache(maxsize=1)
def cpu_extension() -> CpuExtensionStatus:
    """Import ``qft._cpu`` once; never raises. ``QFT_CPU_KERNELS=0`` leaves it unused (CPU ops then run
    on the torch reference, as on a machine where it did not build)."""
    if os.environ.get("QFT_CPU_KERNELS", "1") == "0":
        return CpuExtensionStatus(None, "switched off by QFT_CPU_KERNELS=0")
    try:
        module = importlib.import_module("qft._cpu")
    except ImportError as exc:
        return CpuExtensionStatus(None, str(exc))
    return CpuExtensionStatus(module, "", _share_torchs_threads(module))
