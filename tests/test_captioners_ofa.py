"""The `ofa` backend end to end: a tiny random OFA checkpoint captioned by the worker in .ofa-venv.

Slow: the first run creates the isolated OFA venv (`bash scripts/setup_ofa_env.sh`, a few
minutes; cached under <repo>/.ofa-venv, or $ALIP_OFA_VENV, afterwards, where the script
returns at once). Each
captioner starts a worker process (~10 s, mostly imports).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from alip.captioners import CaptionerError, load_captioner
from alip.captioners.ofa import default_ofa_python, default_ofa_venv

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ofa_python() -> Path:
    """The OFA venv's python, creating the venv if needed (unless ALIP_OFA_PYTHON points elsewhere)."""
    python = default_ofa_python()
    if not os.environ.get("ALIP_OFA_PYTHON"):  # our own venv: create/refresh it (instant when up to date)
        venv = default_ofa_venv()
        proc = subprocess.run(["bash", str(REPO / "scripts" / "setup_ofa_env.sh"), str(venv)],
                              capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, f"setup_ofa_env.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert python.exists(), f"{python} missing"
    return python


@pytest.fixture(scope="module")
def tiny_ofa(ofa_python, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ofa") / "tiny-ofa"
    proc = subprocess.run([str(ofa_python), str(REPO / "scripts" / "make_tiny_ofa.py"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def _images():
    return [Image.new("RGB", (50 + 9 * i, 40), (40 * i, 200 - 30 * i, 90)) for i in range(3)]


def test_ofa_worker_captions_with_paper_settings(tiny_ofa):
    images = _images()
    with load_captioner(f"ofa:{tiny_ofa}", image_size=64, batch_size=2) as cap:
        assert cap.name == (f"{tiny_ofa}[dtype=fp32,beams=5,max_new=16,min_new=1,no_repeat_ngram=3,size=64,"
                            "prompt=' what does the image describe?']")
        # Runs in the isolated env: transformers 4.x + ModelScope, fairseq not installed.
        assert cap.info["transformers"].startswith("4.")
        assert cap.info["modelscope"] == "1.40.2"
        assert cap.info["fairseq"] == "LayerNorm stand-in"
        out = cap.caption(images)
        assert len(out) == 3 and all(isinstance(c, str) and c for c in out)
        assert all(len(c.split()) <= 16 for c in out)
        assert all(c == " ".join(c.split()) for c in out)
        assert cap.caption(images) == out  # deterministic beam search
        assert cap.caption(images[::-1]) == out[::-1]  # order kept across worker batches
        assert cap.caption([]) == []
        with pytest.raises(CaptionerError, match="PIL"):
            cap.caption(["nope"])
        proc = cap._proc
    assert proc.poll() is not None  # the context manager stopped the worker

    # Same checkpoint, other generation settings -> other name, still valid captions.
    with load_captioner(f"ofa:{tiny_ofa}", image_size=64, num_beams=2, max_new_tokens=4) as short:
        assert "beams=2,max_new=4" in short.name
        assert all(len(c.split()) <= 4 for c in short.caption(images))


def test_ofa_errors_are_clear(tiny_ofa, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CaptionerError, match="OFA worker failed during 'load'"):
        load_captioner(f"ofa:{tmp_path}", image_size=64)
    with pytest.raises(CaptionerError, match="OFA environment not found.*setup_ofa_env.sh"):
        load_captioner(f"ofa:{tiny_ofa}", ofa_python=str(tmp_path / "no-venv" / "bin" / "python"))


def test_worker_check_runs_in_isolation(ofa_python):
    proc = subprocess.run([str(ofa_python), str(REPO / "alip" / "captioners" / "ofa_worker.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "transformers 4.46.3" in proc.stdout and "modelscope 1.40.2" in proc.stdout
    # ... while this (main) interpreter runs transformers 5
    import transformers

    assert transformers.__version__.startswith("5.") and sys.prefix != str(Path(ofa_python).parents[1])
