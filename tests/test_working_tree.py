"""`make demo` then `make test` in one checkout: the tests see none of what a user's runs left there.

The defaults that resolve against the current directory or the checkout (demo_out/ and the serve
app's default model in it, runs/, data/, eval_data/) are pointed at scratch paths for the whole
session by tests/conftest.py (`scratch_cwd`). This file checks that in the session itself (fast),
and end to end: a scratch copy of the checkout gets what `make demo` and the README's pipeline
leave (a real model export in demo_out/runs/demo-alip/export, runs/, data/world, ...), the tests
that read those defaults run there as `make test` runs them, pass, and write nothing into it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_readme_commands import _scratch_checkout  # the same copy of the checkout with a linked .venv

ROOT = Path(__file__).resolve().parents[1]

#: the tests that read the default paths, run in the scratch copy beside `make demo`'s output
AFFECTED = (
    "tests/test_working_tree.py::test_the_session_defaults_point_at_scratch_paths",
    "tests/test_serve_api.py::test_entry_points_fail_fast_on_bad_settings_and_models",
    "tests/test_serve_api.py::test_serve_app_limits_and_default_model",
    "tests/test_eval_datasets.py::test_data_root_from_env",
    "tests/test_eval_datasets.py::test_missing_dataset_error_names_layout_and_source",
)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def test_the_session_defaults_point_at_scratch_paths():
    """What each default resolves to in a test, wherever the suite was started from."""
    from alip import demo
    from alip.eval.datasets import resolve_data_root
    from alip.eval.runner import build_parser as eval_parser
    from alip.serving import ServeConfigError
    from alip.serving.deployment import app_builder

    checkout = Path(demo.__file__).resolve().parents[1]  # the checkout whose `alip` runs here
    assert not _inside(Path.cwd(), checkout), f"tests run in {Path.cwd()}, inside the checkout {checkout}"
    demo_out = Path(demo.default_out())
    assert demo_out.is_absolute() and not _inside(demo_out, checkout) and not demo_out.exists()
    assert not Path(demo.demo_export()).exists()
    with pytest.raises(ServeConfigError, match="no model given"):
        app_builder({})  # not the demo export a user's `make demo` left in the checkout
    assert "ALIP_SERVE_MODEL" not in os.environ and "ALIP_EVAL_DATA" not in os.environ
    eval_root = Path(resolve_data_root(None)).resolve()
    assert not _inside(eval_root, checkout) and not eval_root.exists()
    eval_out = Path(eval_parser().parse_args(["--checkpoint", "x"]).out).resolve()
    assert not _inside(eval_out, checkout)
    for rel in ("demo_out", "runs", "data", "eval_data"):  # nothing of a user's run in this directory
        assert not Path(rel).exists(), rel


def _leave_what_make_demo_leaves(checkout: Path) -> None:
    """demo_out/ as `make demo` leaves it (a loadable model export where the serve app looks for its
    default model), and runs/, data/, eval_data/ as the README's pipeline leaves them."""
    import torch

    from alip.model import create_model, export_open_clip

    torch.manual_seed(0)
    model = create_model("alip-micro")
    for run in ("demo_out/runs/demo-alip", "demo_out/runs/demo-clip", "runs/my-run"):
        export_open_clip(model, checkout / run / "export")
    for rel, text in {"demo_out/world/_world.json": json.dumps({"n": 6000, "noise": 0.5, "seed": 0}),
                      "demo_out/world-captioned/_SUCCESS": "", "demo_out/demo_summary.json": "{}",
                      "data/world/_world.json": json.dumps({"n": 256, "noise": 0.5, "seed": 0}),
                      "runs/eval/results.json": "{}", "eval_data/dtd/test/banded/0.png": "not a png"}.items():
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text(text)


def _tree(root: Path) -> set[str]:
    skip = {".venv", ".pytest_cache", "__pycache__"}
    return {str(p.relative_to(root)) for p in root.rglob("*") if not skip & set(p.relative_to(root).parts)}


@pytest.mark.slow
def test_make_demo_then_make_test(tmp_path):
    checkout = _scratch_checkout(tmp_path / "checkout")
    _leave_what_make_demo_leaves(checkout)
    before = _tree(checkout)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_", "ALIP_"))}
    env["PYTHONPATH"] = str(checkout)  # the copy's `alip`, whose checkout holds the demo's output
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *AFFECTED],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{len(AFFECTED)} passed" in proc.stdout, proc.stdout[-2000:]
    assert _tree(checkout) == before, f"the tests wrote into the checkout: {sorted(_tree(checkout) - before)}"
