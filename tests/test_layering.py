"""The import graph flows one way: formats -> tensor -> kernels/csrc -> ops -> functional/adapters ->
nn -> optim/integrations/cli (README "Layout"). Every import in qft/ and kernels/, at module level or
inside a function, is checked against the layer of the module it names."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a module may import its own layer and the ones below.
LAYERS = [
    ("qft._extension", "qft.formats", "qft.reference"),
    ("qft.tensor", "qft.interop"),
    ("qft.kernels",),
    ("qft.ops",),
    ("qft.functional", "qft.adapters"),
    ("qft.nn",),
    ("qft.optim", "qft.integrations", "qft.cli", "qft.__main__", "qft"),
]


def _layer(module: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    assert best is not None, f"{module} has no layer"
    return best[0]


def _modules():
    for path in sorted((ROOT / "qft").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path, path.name == "__init__.py"
    for path in sorted((ROOT / "kernels").glob("*.py")):
        stem = path.stem
        yield "qft.kernels" + ("" if stem == "__init__" else "." + stem), path, stem == "__init__"


def _imports(module: str, path: Path, is_package: bool):
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # "from qft import ops" imports qft.ops: name each imported submodule when it is one
            for alias in node.names:
                yield f"{base}.{alias.name}" if base in ("qft", "qft.ops", "qft.nn", "qft.formats") else base


def _violations():
    found = []
    for module, path, is_package in _modules():
        own = _layer(module)
        for name in _imports(module, path, is_package):
            if name.split(".")[0] != "qft" or name == "qft":
                continue
            if _layer(name) > own:
                found.append(f"{module} (layer {own}) imports {name} (layer {_layer(name)})")
    return found


def test_imports_flow_one_way():
    assert _violations() == []


def test_kernels_are_launched_from_ops_only():
    # every kernel launch goes through qft.ops (dispatch, checks, the custom ops' fakes)
    launchers = set()
    for module, path, is_package in _modules():
        if any(name.startswith("qft.kernels") for name in _imports(module, path, is_package)):
            launchers.add(module.rpartition(".")[0] if not is_package else module)
    assert launchers <= {"qft.ops", "qft.kernels"}, launchers


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # the checker itself must be able to fail: an upward import in a fake module is reported
    fake = tmp_path / "qft" / "formats"
    fake.mkdir(parents=True)
    (fake / "leak.py").write_text("from qft.nn import QuantLinear\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "kernels").mkdir()
    assert _violations() == ["qft.formats.leak (layer 0) imports qft.nn.QuantLinear (layer 5)"]


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(ROOT) for d in ("qft", "kernels") for p in (ROOT / d).rglob("*.py"))
)
def test_no_source_file_over_400_lines(path):
    assert len((ROOT / path).read_text().splitlines()) <= 400
