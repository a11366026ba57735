"""Read what the CUDA compiler made from a cubin, with the ``cuobjdump`` that Triton ships: resource
usage per function and SASS, and the loops in it (a branch back to an earlier address)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path


def tools() -> Path:
    """The folder of Triton's NVIDIA binaries (``cuobjdump``, ``nvdisasm``, ``ptxas``)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def res_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per function: REG, STACK, SHARED, LOCAL from ``cuobjdump -res-usage``."""
    out = _cuobjdump(cubin, "-res-usage")
    found, name = {}, None
    for line in out.splitlines():
        if line.strip().startswith("Function "):
            name = line.strip()[len("Function ") :].rstrip(":")
        elif name and "REG:" in line:
            found[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return found


def sass_functions(cubin: bytes) -> dict[str, list[tuple[int, str]]]:
    """Per function: its SASS instructions as (address, text)."""
    out = _cuobjdump(cubin, "-sass")
    functions = {}
    for chunk in re.split(r"\n\s*Function : ", out)[1:]:
        name, body = chunk.split("\n", 1)
        found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", body)
        functions[name.strip()] = [(int(a, 16), t.strip()) for a, t in found]
    return functions


def loops(instructions: list[tuple[int, str]]) -> list[dict]:
    """Every loop (a branch back to an earlier address): its bounds, length, FMAs, MMAs, loads."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    found = []
    for j, (address, text) in enumerate(instructions):
        branch = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        target = int(branch.group(1), 16) if branch else None
        if target is None or target > address or target not in index:
            continue
        body = [t for _, t in instructions[index[target] : j + 1]]
        loop = {"start": index[target], "end": j, "length": len(body)}
        for key, pattern in (("fma", r"\b[FH]FMA2?\b"), ("mma", r"\bH(G)?MMA\b"), ("global_loads", r"\bLDG\b")):
            loop[key] = sum(1 for t in body if re.search(pattern, t))
        found.append(loop)
    return found


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [str(tools() / "cuobjdump"), flag, f.name], capture_output=True, text=True, check=True
        ).stdout
