"""The shape of the code: layers point down (the import-linter contract in pyproject.toml), and
no module hides an import of another Matten package inside a function."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "matten"


def test_layers_point_down():
    command = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([command], cwd=SRC.parents[1], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Layers point down KEPT" in result.stdout


def function_local_imports(path: Path) -> list[str]:
    """``module:line`` of each import of a Matten package inside a function of ``path``, except
    one guarded by ``try``: a module that needs an optional dependency (triton), loaded when
    first wanted."""
    tree = ast.parse(path.read_text())
    guarded = {
        id(n)
        for t in ast.walk(tree)
        if isinstance(t, ast.Try)
        for stmt in t.body
        for n in ast.walk(stmt)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if id(inner) in guarded:
                continue
            if isinstance(inner, ast.ImportFrom) and (
                inner.level > 0 or (inner.module or "").startswith("matten")
            ):
                found.append(f"{path.relative_to(SRC)}:{inner.lineno}")
            elif isinstance(inner, ast.Import) and any(
                a.name.startswith("matten") for a in inner.names
            ):
                found.append(f"{path.relative_to(SRC)}:{inner.lineno}")
    return found


def test_no_function_local_imports_between_our_packages():
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in function_local_imports(path)]
    assert found == [], (
        "imports inside functions (move them to the top of the module): " + ", ".join(found)
    )


def test_the_checker_sees_a_function_local_import(tmp_path, monkeypatch):
    module = tmp_path / "matten" / "probe.py"
    module.parent.mkdir()
    module.write_text(
        "def f():\n    from .data import read_video\n    import os\n"
        "    try:\n        from . import triton_scan\n    except ImportError:\n"
        "        pass\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "matten")
    assert function_local_imports(module) == ["probe.py:2"]


@pytest.mark.parametrize("layer", ["matten.ssm", "matten.data", "matten.models"])
def test_a_lower_layer_imports_without_the_upper_ones(layer):
    code = (
        f"import sys, {layer}; upper = [m for m in ('matten.training', 'matten.pipelines', "
        "'matten.commands', 'matten.eval') if m in sys.modules]; print(upper)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
