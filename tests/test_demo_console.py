"""`make demo`'s console shows our progress lines and real warnings only (issue 24, item 3).

Fast checks of each fix at its source, then the demo itself, end to end at a small size, with its
console checked for the lines that must not appear:

* torch's "The given NumPy array is not writable ... undefined behavior": read-only arrays (Ray's
  object store, PIL, pyarrow hand them out zero-copy) reach torch only as copies it owns;
* Ray's C++ "Actor with class name ... has constructor arguments in the object store and
  max_restarts > 0": Ray Train's PreemptionWatcher line is dropped from the worker output Ray prints
  on the driver (alip.ray_setup.install_worker_line_filter); the explore job no longer runs an actor
  pool (its scoring runs in Ray Data tasks), so its driver prints none;
* "Loading weights" bars from the actors that load a captioner (transformers' own switch);
* the stale "captioning with the built-in captioner (Ray Data)" header;
* and Ray's known-harmless noise that the README commands' console is checked for (NOISE of
  tests/test_readme_commands.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from log_capture import capture_loggers
from test_readme_commands import NOISE

#: what the demo's console must not show, beside NOISE
FORBIDDEN = (
    "The given NumPy array is not writable",
    "has constructor arguments in the object store",
    "Loading weights",
    "captioning with the built-in captioner (Ray Data)",
)
#: our progress lines, in the order they come
OURS = (
    "=== 1/4 generating the built-in world",
    "[ray] starting a private local Ray",
    "=== 2/4 captioning with the built-in captioner",
    "[caption] 1/1 units",
    "caption job summary",
    "=== 3/4 pretraining ALIP",
    "[pretrain] step 1/",
    "=== 3/4 pretraining CLIP",
    "=== 4/4 zero-shot top-1",
    "=== class activation maps",
    "=== data explorer",
    "[explore] wrote",
    "Serve the ALIP model with",
)


def test_read_only_arrays_reach_torch_only_as_copies():
    """Each place an array that may be read-only (object store, PIL, pyarrow) becomes a tensor, in a
    fresh process where torch's warning (shown once per process) is an error."""
    code = textwrap.dedent("""
        import warnings
        import numpy as np, torch
        warnings.simplefilter("error", UserWarning)
        from alip.captioners.hf import _writable
        from alip.pretrain.data import CropBox, resize_crop
        from alip.pretrain.job import _host_tensor

        def read_only(a):
            a.flags.writeable = False
            return a

        pixels = read_only(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
        out = resize_crop(pixels, CropBox(0, 0, 50, 40), 16)
        same = resize_crop(pixels.copy(), CropBox(0, 0, 50, 40), 16)
        assert out.shape == (3, 16, 16) and (out == same).all()
        tokens = read_only(np.arange(12, dtype=np.uint16).reshape(3, 4))
        t = _host_tensor(tokens, torch.int64, pin=False)
        assert t.dtype == torch.int64 and t.tolist() == tokens.astype(np.int64).tolist()
        images = read_only(np.ones((2, 3, 4, 4), np.uint8))
        t = _host_tensor(images, torch.uint8, pin=False)
        t += 1  # the trainer's own memory
        assert (images == 1).all() and (t == 2).all()
        pix = read_only(np.ones((2, 3, 8, 8), np.float32))
        shared = _writable(pix)
        assert shared is not pix and shared.flags.writeable and not np.shares_memory(shared, pix)
        mine = np.ones((2, 3), np.float32)
        assert _writable(mine) is mine  # a writable contiguous array is shared, not copied
        torch.from_numpy(_writable(pix))
        try:
            torch.from_numpy(pix)  # the control: this check does catch the warning
        except UserWarning as e:
            assert "not writable" in str(e)
            print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_loading_a_captioner_shows_no_progress_bar_and_keeps_the_switch(capfd):
    import torch
    from transformers.utils import logging as hf_logging

    from alip.captioners.base import BUILTIN_MODEL_DIR
    from alip.captioners.hf import load_model

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        model, _ = load_model(str(BUILTIN_MODEL_DIR), torch.float32, "cpu")
        assert model is not None
        assert hf_logging.is_progress_bar_enabled()  # the caller's setting, restored after the load
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out


@pytest.fixture
def print_handler(monkeypatch):
    """A fresh copy of Ray's driver-side log dispatcher, with a recording printer under Ray's name."""
    from ray._private import ray_logging

    from alip import ray_setup

    monkeypatch.delenv(ray_setup.VERBOSE_ENV, raising=False)
    dispatcher = ray_logging.WorkerStandardStreamDispatcher()
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)
    printed, other = [], []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(data["lines"]))
    dispatcher.add_handler("another", lambda data: other.append(data["lines"]))
    return dispatcher, printed, other


def test_harmless_worker_lines_never_reach_the_console(print_handler):
    from alip import ray_setup

    dispatcher, printed, other = print_handler
    ray_setup.install_worker_line_filter()
    ray_setup.install_worker_line_filter()  # idempotent: one wrapper
    assert [n for n, _ in dispatcher.handlers].count("ray_print_logs") == 1
    watcher = ("[2026-12-03 18:02:35,914 E 4835 4868] core_worker.cc:2465: Actor with class name: "
               "'PreemptionWatcher' and ID: '4305' has constructor arguments in the object store and "
               "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
               "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
    ours = watcher.replace("'PreemptionWatcher'", "'MyActor'")  # anyone else's actor: shown
    dispatcher.emit({"lines": [watcher, "[pretrain] step 1/2", ours], "pid": 1, "is_err": True})
    dispatcher.emit({"lines": [watcher], "pid": 1, "is_err": True})  # nothing left: nothing printed
    assert printed == [["[pretrain] step 1/2", ours]]
    assert len(other) == 2 and other[0][0] == watcher  # other handlers see everything, as before


def test_verbose_keeps_the_worker_lines(print_handler, monkeypatch):
    from alip import ray_setup

    dispatcher, printed, _ = print_handler
    monkeypatch.setenv(ray_setup.VERBOSE_ENV, "1")
    ray_setup.install_worker_line_filter()
    line = "Actor with class name: 'PreemptionWatcher' and ID: 'x' has constructor arguments in the object store"
    dispatcher.emit({"lines": [line], "pid": 1, "is_err": True})
    assert printed == [[line]]


def test_ray_datas_end_of_dataset_info_line_is_dropped_a_failure_is_not(caplog, monkeypatch):
    import logging

    from alip import ray_setup

    monkeypatch.delenv(ray_setup.VERBOSE_ENV, raising=False)
    logger = logging.getLogger("ray.data._internal.execution.streaming_executor")
    saved = {n: list(logging.getLogger(n).filters) for n, _ in ray_setup.HARMLESS_MESSAGES}
    try:
        ray_setup.install_log_filters()
        with capture_loggers(caplog, logger.name):
            logger.info("\u2714\ufe0f  Dataset dataset_03_0 execution finished in 16.40 seconds")
            logger.info("\u26a0\ufe0f  Dataset dataset_04_0 execution failed")
    finally:  # every logger as it was: other tests check the filters' absence
        for n, filters in saved.items():
            logging.getLogger(n).filters[:] = filters
    assert [r.getMessage()[-16:] for r in caplog.records] == ["execution failed"]


@pytest.mark.slow
def test_the_demo_console_shows_our_lines_and_no_noise(tmp_path):
    """The whole demo at a small size (256 samples, 1 epoch: a minute or two), as `make demo` runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_", "ALIP_RAY_VERBOSE"))}
    proc = subprocess.run([sys.executable, "-m", "alip.demo", "--out", str(tmp_path / "demo"), "--n", "256",
                           "--epochs", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    console = proc.stdout
    assert proc.returncode == 0, console[-6000:]
    noisy = [line for line in console.splitlines() if any(n in line for n in FORBIDDEN + NOISE)]
    assert not noisy, "lines that must not reach the demo's console:\n" + "\n".join(noisy[:20])
    positions = [console.find(line) for line in OURS]
    missing = [line for line, at in zip(OURS, positions) if at < 0]
    assert not missing, f"our progress lines missing: {missing}\n{console[-4000:]}"
    assert positions == sorted(positions), "our progress lines out of order:\n" + console[-4000:]
    assert (tmp_path / "demo" / "runs" / "demo-alip" / "export" / "open_clip_config.json").is_file()
