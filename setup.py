"""Build qft: pure Python, plus two optional extensions.

* ``qft._C``, the CUDA kernels, when nvcc is found: one pybind11 module over ``csrc/*.cu`` (and
  ``csrc/*.cpp``), compiled by nvcc through a generated ninja file.
* ``qft._cpu``, the CPU kernels, with the host C++ compiler: one pybind11 module over
  ``csrc/cpu/*.cpp`` (x86 AVX2 / AVX-512 paths chosen at run time, so the binary runs on any x86-64),
  with OpenMP where the compiler has it (it then shares torch's libgomp threads). A failed build is a
  warning: qft then runs its CPU ops on the torch reference.

Neither includes a torch header, so both build without a GPU and without matching torch's ABI.

Environment:
    QFT_SKIP_CUDA_BUILD=1   build no CUDA extension
    QFT_SKIP_CPU_BUILD=1    build no CPU extension
    QFT_CUDA_ARCHS="80;90a" GPU targets (sm_XX; default sm_80 and sm_90a)
    CUDA_HOME / nvcc on PATH where to find the CUDA toolkit
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"


def find_nvcc() -> str | None:
    """Path of nvcc from CUDA_HOME or PATH, or None."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def gencode_flags(archs: str) -> list[str]:
    """``-gencode`` flags for a ';'- or ','-separated list such as ``80;90a``."""
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().removeprefix("sm_")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise ValueError(f"QFT_CUDA_ARCHS names no architecture: {archs!r}")
    return flags


def ninja_file(sources: list[Path], build_dir: Path, output: Path, nvcc: str) -> str:
    """Text of a build.ninja that compiles ``sources`` with nvcc and links ``output``."""
    import pybind11

    includes = [ROOT / "csrc", pybind11.get_include(), sysconfig.get_paths()["include"]]
    include_flags = " ".join(f"-I{p}" for p in includes)
    archs = " ".join(gencode_flags(os.environ.get("QFT_CUDA_ARCHS", DEFAULT_ARCHS)))
    host = "-Xcompiler=-fPIC -Xcompiler=-fvisibility=hidden"
    lines = [
        f"nvcc = {nvcc}",
        f"cflags = -O3 -std=c++17 {host} {include_flags}",
        f"cuflags = {archs} --expt-relaxed-constexpr",
        "rule cu",
        "  command = $nvcc $cflags $cuflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule cpp",
        "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule link",
        "  command = $nvcc -shared $in -o $out --cudart=static",
    ]
    objects = []
    for src in sources:
        obj = build_dir / (src.name + ".o")
        objects.append(str(obj))
        lines.append(f"build {obj}: {'cu' if src.suffix == '.cu' else 'cpp'} {src}")
    lines.append(f"build {output}: link {' '.join(objects)}")
    return "\n".join(lines) + "\n"


# -ffp-contract=off: each product and sum rounds once, as the reference's torch ops do (no fused
# multiply-add unless a kernel asks for one); -fno-math-errno lets sqrt vectorize (no result changes).
CPU_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden", "-pthread"]


class NinjaCudaBuild(build_ext):
    """Builds ``qft._C`` with nvcc + ninja and ``qft._cpu`` with the host compiler."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "qft._cpu":
            import pybind11

            ext.include_dirs = [pybind11.get_include(), str(ROOT / "csrc" / "cpu")]
            openmp = ["-fopenmp"] if self._compiles_openmp() else []
            if not openmp:
                print("qft: the C++ compiler has no OpenMP; qft._cpu runs each call on one thread", file=sys.stderr)
            ext.extra_compile_args = CPU_FLAGS + openmp
            ext.extra_link_args = ["-pthread", *openmp]
            super().build_extension(ext)
            return
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        nvcc = find_nvcc()
        build_dir = Path(self.build_temp).resolve() / "qft_cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        sources = [ROOT / s for s in ext.sources]
        (build_dir / "build.ninja").write_text(ninja_file(sources, build_dir, output, nvcc))
        ninja = shutil.which("ninja")
        if ninja is None:
            import ninja as ninja_pkg  # the PyPI package ships the binary

            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        subprocess.run([ninja, "-C", str(build_dir)], check=True)

    def _compiles_openmp(self) -> bool:
        """Whether the host compiler compiles and links a shared object with ``-fopenmp`` (gcc does;
        Apple's clang does not without a separate libomp)."""
        import tempfile

        probe = "#include <omp.h>\nint qft_probe() { return omp_get_max_threads(); }\n"
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "probe.cpp"
            source.write_text(probe)
            try:
                objects = self.compiler.compile([str(source)], output_dir=tmp, extra_postargs=["-fopenmp", "-fPIC"])
                self.compiler.link_shared_object(objects, str(Path(tmp) / "probe.so"), extra_postargs=["-fopenmp"])
            except Exception:  # CompileError, LinkError, or a compiler that is not gcc-like
                return False
        return True


cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c[up]*") if p.suffix in (".cu", ".cpp"))


cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))


def extensions() -> list[Extension]:
    """qft._C and qft._cpu, each unless skipped: an extension that is declared but not built breaks
    (editable) wheels, so the CUDA one is left out without nvcc; the CPU one is optional (a failed
    compile warns)."""
    found = []
    if os.environ.get("QFT_SKIP_CPU_BUILD") == "1":
        print("qft: not building qft._cpu (QFT_SKIP_CPU_BUILD=1); CPU ops run on the torch reference", file=sys.stderr)
    else:
        headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.h"))
        found.append(Extension("qft._cpu", sources=cpu_sources, depends=headers, language="c++", optional=True))
    skip = "QFT_SKIP_CUDA_BUILD=1" if os.environ.get("QFT_SKIP_CUDA_BUILD") == "1" else None
    skip = skip or (None if find_nvcc() else "nvcc not found")
    if skip:
        print(f"qft: not building qft._C ({skip}); qft runs without it", file=sys.stderr)
        return found
    return [*found, Extension("qft._C", sources=cuda_sources)]


setup(
    packages=[*find_packages(include=["qft", "qft.*"]), "qft.kernels"],
    package_dir={"qft": "qft", "qft.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": NinjaCudaBuild},
)
