"""The library does not import the app layer: nothing under alip/ imports the top-level `serve`
package (serve/app.py, the Serve CLI's import path, imports alip, never the other way round)."""
from __future__ import annotations

import ast
from pathlib import Path

ALIP = Path(__file__).resolve().parents[1] / "alip"
APP_PACKAGES = ("serve",)


def _is_app(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in APP_PACKAGES


def app_imports(source: str, filename: str = "<src>") -> list[str]:
    """`import serve...`, `from serve... import ...` (absolute only: `from ray import serve` is Ray's)
    and importlib.import_module / __import__ of a literal "serve..." name, as 'line: text'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if _is_app(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_app(node.module):
            found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str) \
                    and _is_app(node.args[0].value):
                found.append(f"{node.lineno}: {name}({node.args[0].value!r})")
    return found


def test_the_scan_finds_each_way_of_importing_serve():
    src = ("import serve\nimport serve.app as a\nfrom serve.app import run_local\nfrom serve import app\n"
           "import importlib\nimportlib.import_module('serve.app')\n__import__('serve')\n"
           "from ray import serve\nfrom ray.serve import Application\nfrom . import serve\nimport served\n")
    assert [f.split(":")[0] for f in app_imports(src)] == ["1", "2", "3", "4", "6", "7"]


def test_no_module_under_alip_imports_the_app_layer():
    files = sorted(ALIP.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} modules under {ALIP}"
    offenders = {str(f.relative_to(ALIP.parent)): hits for f in files if (hits := app_imports(f.read_text(), str(f)))}
    assert not offenders, f"alip/ imports the app layer (serve/): {offenders}"


def test_the_pages_ship_with_the_library():
    from alip.serving import deployment, explore

    assert deployment.PAGE.is_file() and explore.PAGE.is_file()
    assert deployment.PAGE.parent == explore.PAGE.parent == ALIP / "serving" / "static"
