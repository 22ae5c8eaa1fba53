"""The layer contract of docs/design.md: import-linter's contracts hold, and no module takes another's privates."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dgmood"


def _private_imports(path: Path, root: Path = SRC) -> list[str]:
    """``from dgmood.x import _name`` (or a relative form) in one module: the names and line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dgmood")):
            found += [f"{path.relative_to(root)}:{node.lineno} {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names():
    offenders = [hit for path in sorted(SRC.rglob("*.py")) for hit in _private_imports(path)]
    assert offenders == []


def test_private_import_check_sees_absolute_and_relative_forms(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from dgmood.data.datasets import _raw_images, load_images\nfrom .cache import _key\n"
                      "from numpy import _core\nfrom dgmood import __version__\n")
    assert _private_imports(module, tmp_path) == ["m.py:1 _raw_images", "m.py:2 _key"]


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    out = subprocess.run([exe, "--config", str(SRC.parents[1] / "pyproject.toml")], capture_output=True, text=True,
                         cwd=SRC.parents[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout
