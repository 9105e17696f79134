"""OFA captioning worker: runs inside the isolated OFA venv (scripts/setup_ofa_env.sh).

Do not import ``alip`` here: this file runs with the OFA venv's python (transformers 4.x +
ModelScope), not the project's. The main-venv side is alip/captioners/ofa.py.

Protocol (stdin -> requests, stdout -> replies): each message is a 4-byte big-endian length
followed by a pickle of plain builtins (dict/list/str/bytes/int/float/bool/None).

    {"op": "load", "model_dir": str, "device": str, "dtype": str|None, "num_beams": int,
     "max_new_tokens": int, "min_new_tokens": int, "no_repeat_ngram_size": int,
     "prompt": str, "image_size": int, "extra": dict}            -> {"ok": True, "info": {...}}
    {"op": "caption", "images": [png bytes, ...]}                -> {"ok": True, "captions": [str, ...]}
    {"op": "close"}                                              -> {"ok": True}, then exit
    any failure                                                  -> {"ok": False, "error": str, "traceback": str}

Anything the libraries print goes to stderr: fd 1 is re-pointed at stderr at start-up and the
protocol uses a private duplicate of the original stdout.

Why no fairseq: ModelScope's OFA package imports fairseq in two places the caption path does
not need: its ``__init__`` (for MMSpeech, the speech model) and ``vit.py`` (the OFASys ViT
variants) for ``fairseq.modules.LayerNorm``. We import the submodules without running the
package ``__init__``, and, when fairseq is absent, register a one-name stand-in for
``fairseq.modules.LayerNorm``, which in fairseq itself is ``torch.nn.LayerNorm`` unless NVIDIA
apex is installed. ``fairseq.ngram_repeat_block_cuda`` stays missing, so ModelScope uses its
pure-PyTorch n-gram blocking (it checks for the extension with try/except).

Run ``python ofa_worker.py --check`` to verify the environment.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import string
import struct
import sys
import traceback
import types

OFA_PKG = "modelscope.models.multi_modal.ofa"
FAIRSEQ_STAND_IN = False  # set when _import_ofa registers the LayerNorm stand-in


def _import_ofa():
    """Import OFAModel, OFATokenizer and SequenceGenerator from ModelScope (see module doc)."""
    global FAIRSEQ_STAND_IN
    if importlib.util.find_spec("fairseq") is None and "fairseq" not in sys.modules:
        import torch

        FAIRSEQ_STAND_IN = True

        fairseq = types.ModuleType("fairseq")
        fairseq.__path__ = []  # a package, so `from fairseq import x` fails with ImportError
        modules = types.ModuleType("fairseq.modules")

        def LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, export=False):
            return torch.nn.LayerNorm(normalized_shape, eps, elementwise_affine)

        modules.LayerNorm = LayerNorm
        fairseq.modules = modules
        sys.modules.setdefault("fairseq", fairseq)
        sys.modules.setdefault("fairseq.modules", modules)
    if OFA_PKG not in sys.modules:
        spec = importlib.util.find_spec(OFA_PKG)
        if spec is None:
            raise ImportError(f"{OFA_PKG} not found: is modelscope installed in this venv ({sys.prefix})?")
        sys.modules[OFA_PKG] = importlib.util.module_from_spec(spec)  # __init__ deliberately not executed
    from modelscope.models.multi_modal.ofa.generate import sequence_generator
    from modelscope.models.multi_modal.ofa.modeling_ofa import OFAModel
    from modelscope.models.multi_modal.ofa.tokenization_ofa import OFATokenizer

    return OFAModel, OFATokenizer, sequence_generator.SequenceGenerator


class OFARunner:
    """Loads one OFA checkpoint and captions PNG-encoded images with ModelScope's generator."""

    def __init__(self, req: dict):
        import json

        import torch

        OFAModel, OFATokenizer, SequenceGenerator = _import_ofa()
        self.torch = torch
        model_dir = req["model_dir"]
        device = req.get("device", "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but torch in the OFA venv sees no CUDA GPU")
        dtype = {None: torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            req.get("dtype")
        ]
        self.tokenizer = OFATokenizer.from_pretrained(model_dir)
        model = OFAModel.from_pretrained(model_dir)
        if not model.config.use_ofasys:
            # As ModelScope's OfaForAllTasks: OFA's vocabulary = BPE + 8192 image codes + 1000 bins.
            self.tokenizer.add_tokens([f"<code_{i}>" for i in range(8192)])
            self.tokenizer.add_tokens([f"<bin_{i}>" for i in range(1000)])
        if len(self.tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}"
            )
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        # ModelScope's preprocessor: mean/std 0.5 unless the checkpoint asks for ImageNet stats.
        mean, std = [0.5] * 3, [0.5] * 3
        cfg_path = os.path.join(model_dir, "configuration.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                if json.load(f).get("model", {}).get("imagenet_default_mean_and_std", False):
                    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.image_size = int(req["image_size"])
        prompt_ids = self.tokenizer(req["prompt"], add_special_tokens=False)["input_ids"]
        self.source = [self.tokenizer.bos_token_id, *prompt_ids, self.tokenizer.eos_token_id]
        gen_args = dict(
            tokenizer=self.tokenizer,
            beam_size=int(req["num_beams"]),
            max_len_b=int(req["max_new_tokens"]),
            min_len=max(1, int(req.get("min_new_tokens", 1))),
            no_repeat_ngram_size=int(req.get("no_repeat_ngram_size", 0)),
            constraint_range=None,
        )
        gen_args.update(req.get("extra") or {})
        self.generator = SequenceGenerator(**gen_args)
        # ModelScope's caption post-processing removes punctuation (OfaForAllTasks.postprocess).
        self.transtab = str.maketrans({key: None for key in string.punctuation})
        self.info = {
            "vocab": len(self.tokenizer),
            "params": sum(p.numel() for p in self.model.parameters()),
            "transformers": __import__("transformers").__version__,
            "modelscope": __import__("modelscope").__version__,
            "torch": torch.__version__,
            "fairseq": "LayerNorm stand-in" if FAIRSEQ_STAND_IN else "installed",
        }

    def _pixels(self, png: bytes):
        from PIL import Image

        torch = self.torch
        image = Image.open(io.BytesIO(png)).convert("RGB")
        # torchvision's Resize on a PIL image is exactly this PIL call (ModelScope uses it).
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std

    def caption(self, pngs: list[bytes]) -> list[str]:
        torch = self.torch
        if not pngs:
            return []
        n = len(pngs)
        images = torch.stack([self._pixels(p) for p in pngs]).to(self.device, self.dtype)
        sample = {
            "net_input": {
                "input_ids": torch.tensor([self.source] * n, dtype=torch.long, device=self.device),
                "patch_images": images,
                "patch_masks": torch.ones(n, dtype=torch.bool, device=self.device),
            }
        }
        with torch.no_grad():
            outputs = self.generator.generate([self.model], sample)
        best = [hyps[0]["tokens"] for hyps in outputs]
        texts = self.tokenizer.batch_decode(best, skip_special_tokens=True)
        return [" ".join(t.translate(self.transtab).split()) for t in texts]


def _read(stream) -> dict | None:
    header = stream.read(4)
    if len(header) < 4:
        return None  # parent closed the pipe
    (size,) = struct.unpack(">I", header)
    return pickle.loads(stream.read(size))


def _write(stream, message: dict) -> None:
    data = pickle.dumps(message, protocol=4)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def serve() -> None:
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol stream
    sys.stdout = sys.stderr
    proto_in = sys.stdin.buffer
    runner = None
    while True:
        req = _read(proto_in)
        if req is None or req.get("op") == "close":
            if req is not None:
                _write(proto_out, {"ok": True})
            return
        try:
            if req["op"] == "load":
                runner = OFARunner(req)
                _write(proto_out, {"ok": True, "info": runner.info})
            elif req["op"] == "caption":
                if runner is None:
                    raise RuntimeError("caption requested before load")
                _write(proto_out, {"ok": True, "captions": runner.caption(req["images"])})
            else:
                raise ValueError(f"unknown op {req.get('op')!r}")
        except Exception as exc:  # report to the parent; it raises a clear error there
            _write(proto_out, {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def check() -> None:
    import modelscope
    import torch
    import transformers

    _import_ofa()
    print(f"ofa worker ok: python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, modelscope {modelscope.__version__}")


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        check()
    else:
        serve()
