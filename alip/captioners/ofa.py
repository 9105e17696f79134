"""The ``ofa`` backend: OFA (the ALIP paper's captioner) through a worker in its own venv.

transformers has no OFA; the maintained implementation is ModelScope's, which needs
transformers 4.x while this project runs transformers 5. So the model runs in a separate
process started with the OFA venv's python (``bash scripts/setup_ofa_env.sh`` creates
``.ofa-venv``), executing alip/captioners/ofa_worker.py. Requests and replies are
length-prefixed pickles of plain builtins over the worker's stdin/stdout; images travel as
PNG bytes (lossless, and PIL-version independent).

Settings follow the paper (ALIP supplement): prompt " what does the image describe?",
beam 5, at most 16 tokens, no repeated 3-grams, 480 px bicubic, mean/std 0.5.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from alip.captioners.base import CaptionerConfig, CaptionerError
from alip.captioners.files import resolve_model_dir

WORKER = Path(__file__).resolve().parent / "ofa_worker.py"
SETUP_HINT = (
    "create it with `bash scripts/setup_ofa_env.sh` (or `make ofa-env`); ALIP_OFA_VENV / ALIP_OFA_PYTHON "
    "point at another one"
)


def default_ofa_venv() -> Path:
    """$ALIP_OFA_VENV, else <repo>/.ofa-venv (where scripts/setup_ofa_env.sh creates it)."""
    env = os.environ.get("ALIP_OFA_VENV")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".ofa-venv"


def default_ofa_python() -> Path:
    """$ALIP_OFA_PYTHON, else the python of :func:`default_ofa_venv`."""
    env = os.environ.get("ALIP_OFA_PYTHON")
    return Path(env) if env else default_ofa_venv() / "bin" / "python"


class OFAPreparer:
    """The CPU half of :class:`OFACaptioner`: bicubic resize to ``image_size`` (the worker's own
    resize then is a no-op); normalisation stays in the worker, whose torch does it on the device."""

    def __init__(self, config: CaptionerConfig):
        if config.backend != "ofa":
            raise CaptionerError(f"OFAPreparer needs backend 'ofa', got {config.backend!r}")
        if not config.image_size:
            raise CaptionerError("the ofa backend needs an image_size (see OFA_DEFAULTS)")
        self.config = config
        self.name = config.name
        self.input_size = int(config.image_size)

    def prepare(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        if not isinstance(images, (list, tuple)):
            raise CaptionerError(f"prepare() takes a list of PIL images, got {type(images).__name__}")
        side = self.input_size
        out = np.empty((len(images), side, side, 3), dtype=np.uint8)
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise CaptionerError(f"prepare() item {i} is {type(im).__name__}, expected a PIL.Image")
            im = im.convert("RGB")
            if im.size != (side, side):
                im = im.resize((side, side), Image.Resampling.BICUBIC)
            out[i] = np.asarray(im)
        return {"pixels": out}


class OFACaptioner:
    """Caption images with an OFA checkpoint (ModelScope format) in the isolated OFA venv."""

    def __init__(self, config: CaptionerConfig):
        if config.backend != "ofa":
            raise CaptionerError(f"OFACaptioner needs backend 'ofa', got {config.backend!r}")
        if not config.prompt or not config.image_size:
            raise CaptionerError("the ofa backend needs a prompt and an image_size (see OFA_DEFAULTS)")
        self.config = config
        self.name = config.name
        python = Path(config.ofa_python) if config.ofa_python else default_ofa_python()
        if not config.model.startswith("s3://"):  # a wrong local path is the likelier mistake: say so first
            resolve_model_dir(config.model, allow_hub_id=False)
        if not python.exists():
            raise CaptionerError(f"OFA environment not found: {python} does not exist; {SETUP_HINT}")
        self.model_dir = resolve_model_dir(config.model, allow_hub_id=False)
        if not os.path.exists(os.path.join(self.model_dir, "config.json")):
            raise CaptionerError(f"{self.model_dir!r} holds no config.json: not an OFA checkpoint directory")

        # The worker's own prints/warnings go to a temp file; its tail is shown on failure.
        self._stderr = tempfile.TemporaryFile()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PYTHONNOUSERSITE"] = "1"  # keep the OFA venv isolated from user site-packages
        self._proc = subprocess.Popen(
            [str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env
        )
        self._lock = threading.Lock()  # one request at a time on the pipe
        c = config
        self.info = self._request(
            {
                "op": "load",
                "model_dir": self.model_dir,
                "device": c.device,
                "dtype": c.dtype,
                "num_beams": c.num_beams,
                "max_new_tokens": c.max_new_tokens,
                "min_new_tokens": c.min_new_tokens,
                "no_repeat_ngram_size": c.no_repeat_ngram_size,
                "prompt": c.prompt,
                "image_size": c.image_size,
                "extra": dict(c.extra),
            }
        )["info"]

    # -- transport ----------------------------------------------------------------------------
    def _stderr_tail(self, n: int = 3000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-n:]

    def _request(self, message: dict) -> dict:
        with self._lock:
            if self._proc.poll() is not None:
                raise CaptionerError(
                    f"OFA worker exited with code {self._proc.returncode}; its stderr:\n{self._stderr_tail()}"
                )
            data = pickle.dumps(message, protocol=4)
            try:
                self._proc.stdin.write(struct.pack(">I", len(data)) + data)
                self._proc.stdin.flush()
                header = self._proc.stdout.read(4)
                reply = None
                if len(header) == 4:
                    reply = pickle.loads(self._proc.stdout.read(struct.unpack(">I", header)[0]))
            except (BrokenPipeError, OSError, pickle.UnpicklingError) as exc:
                raise CaptionerError(f"lost the OFA worker ({exc}); its stderr:\n{self._stderr_tail()}") from exc
            if reply is None:
                self._proc.wait(timeout=10)
                raise CaptionerError(
                    f"OFA worker exited with code {self._proc.returncode} during {message['op']!r}; "
                    f"its stderr:\n{self._stderr_tail()}"
                )
        if not reply.get("ok"):
            raise CaptionerError(
                f"OFA worker failed during {message['op']!r} on {self.config.model!r}: {reply.get('error')}\n"
                f"{reply.get('traceback', '')}"
            )
        return reply

    # -- protocol -----------------------------------------------------------------------------
    def prepare(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        return OFAPreparer(self.config).prepare(images)

    def generate_prepared(self, inputs: dict[str, np.ndarray]) -> list[str]:
        """Captions for :meth:`prepare`'s resized pixels (sent to the worker as PNG, lossless)."""
        pixels = np.asarray(inputs["pixels"], dtype=np.uint8)
        captions: list[str] = []
        for start in range(0, len(pixels), self.config.batch_size):
            pngs = []
            for arr in pixels[start:start + self.config.batch_size]:
                buf = io.BytesIO()
                Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
                pngs.append(buf.getvalue())
            captions.extend(self._request({"op": "caption", "images": pngs})["captions"])
        return captions

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not isinstance(images, (list, tuple)):
            raise CaptionerError(f"caption() takes a list of PIL images, got {type(images).__name__}")
        captions: list[str] = []
        bs = self.config.batch_size
        for start in range(0, len(images), bs):
            pngs = []
            for i, im in enumerate(images[start:start + bs], start):
                if not isinstance(im, Image.Image):
                    raise CaptionerError(f"caption() item {i} is {type(im).__name__}, expected a PIL.Image")
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG", compress_level=1)
                pngs.append(buf.getvalue())
            captions.extend(self._request({"op": "caption", "images": pngs})["captions"])
        return captions

    def close(self) -> None:
        """Stop the worker process (also done when the captioner is garbage-collected)."""
        proc = getattr(self, "_proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            self._request({"op": "close"})
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            proc.kill()
            proc.wait()
        finally:
            self._stderr.close()

    def __del__(self) -> None:
        if sys.meta_path is not None:  # interpreter not shutting down
            self.close()

    def __enter__(self) -> "OFACaptioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
