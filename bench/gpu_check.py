"""The GPU check: one prepared, Ray-free script that prints ONE table of what a GPU machine does.

    python3 bench/gpu_check.py                      # on a GPU machine, <= ~8 minutes (--budget-s)
    python3 bench/gpu_check.py --compile            # also torch.compile'd towers (inductor)
    .venv/bin/python bench/gpu_check.py --tiny --compile   # CPU, tiny sizes, ~1 min (what CI runs)

Rows:
  train      ALIP vs CLIP training steps of ViT-B/32 and ViT-B/16 (forward + backward + AdamW, the
             real `alip.training.ALIPTrainer` step: uint8 images normalised on the device, trimmed
             text passes, precision "auto" = bf16 where the GPU has it, else fp16 + GradScaler) at the
             largest batch that fits (doubling from --start-batch until out of memory, at most
             --max-batch), eager and, with --compile, torch.compile'd towers: samples/s, peak
             memory, MFU.
  preprocess the training data path (alip.pretrain.data.TrainPreprocessor: JPEG decode with
             reduced-size decoding, random resized crop, flip, tokenisation) on all the machine's
             cores, on synthetic web-like JPEGs (500x375, quality 90): samples/s, and its ratio to
             the fastest training row (goal >= 1.5x: data never limits).
  caption    a BLIP-large-sized captioner (transformers' BlipForConditionalGeneration from a config,
             RANDOM weights: nothing to download; ViT-L/16 at 384 px + BERT-base decoder), fp16 on
             GPU, beam search 3, exactly 20 new tokens: images/s.
  serve      the serving encoder (alip.serving.encoder.Encoder) of ViT-B/32: image and text
             embeddings/s.

MFU = model FLOPs actually executed per step / step time / peak. The FLOPs are counted by
torch.utils.flop_counter.FlopCounterMode over one eager step (every matmul, convolution and
attention of forward and backward, with the trimmed text lengths actually used; the optimiser's
elementwise work is not counted, as usual); the compiled step executes the same math. The peak is
MEASURED here with large bf16 matmuls (fp32 on CPU): "MFU" is against that; the vendor's dense
bf16 spec, where the GPU name is known, is printed beside it.

Carrying it to a device machine (it has torch and transformers; no ray, no network):
    pip download open_clip_torch==3.3.0 ftfy regex wcwidth timm huggingface_hub --no-deps -d wheels/
    # (on the machine)
    python3 -m pip install --no-index --no-deps wheels/*.whl
    PYTHONPATH=. python3 bench/gpu_check.py --compile --json gpu_check.json
alip's own imports on these paths pull in no Ray (tests/test_gpu_check.py proves it). If pyarrow
is missing there, the preprocess row falls back to decode + crop with PIL and says so.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable without install

import torch  # noqa: E402

# Vendor dense bf16 peaks (FLOP/s), without sparsity; fp16 where the GPU has no bf16 (V100, T4).
SPEC_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12}

WORDS = ("red blue green small large circle square star striped dotted photo picture trip beach day "
         "left right top bottom center gray background object thing with on the of a").split()


@dataclass
class Row:
    section: str
    config: str
    samples_per_s: float
    peak_memory_gb: float | None = None
    mfu: float | None = None
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def measured_peak(device: torch.device, tiny: bool) -> float:
    """Achievable matmul FLOP/s: bf16 on GPU, fp32 on CPU (the dtype the step's matmuls run in)."""
    n = 512 if tiny else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 5 if tiny else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def image_and_context(model_name: str) -> tuple[int, int]:
    from alip.model import model_config

    cfg = model_config(model_name)
    size = cfg["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0]), int(cfg.get("text_cfg", {}).get("context_length", 77))


def texts(n: int, rng: random.Random, low: int, high: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


class TrainBench:
    def __init__(self, device: torch.device, steps: int, compile_backend: str):
        self.device, self.steps, self.compile_backend = device, steps, compile_backend

    def _trainer(self, model_name: str, objective: str, batch: int, compile: bool):
        import alip.model
        from alip.model import create_model
        from alip.training import ALIPTrainer, TrainConfig

        alip.model.COMPILE_BACKEND = self.compile_backend
        torch.manual_seed(0)
        model = create_model(model_name, device=self.device)
        cfg = TrainConfig(model=model_name, objective=objective, global_batch_size=batch, precision="auto",
                          compile=compile)
        return ALIPTrainer(cfg, model, total_steps=self.steps + 4, device=self.device)

    def _batch(self, model_name: str, batch: int):
        from alip.model import get_tokenizer

        size, _ = image_and_context(model_name)
        rng = random.Random(0)
        tok = get_tokenizer(model_name)
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=self.device)
        # alt-text-like raw texts (8-25 tokens) and captions (<= 20 tokens): tokens stay on the CPU
        return images, tok(texts(batch, rng, 6, 20)), tok(texts(batch, rng, 6, 16))

    def fits(self, model_name: str, batch: int) -> bool:
        """One eager ALIP step at this batch (ALIP needs more memory than CLIP)."""
        trainer = data = None
        try:
            trainer = self._trainer(model_name, "alip", batch, compile=False)
            data = self._batch(model_name, batch)
            trainer.train_step(*data)
            sync(self.device)
            return True
        except Exception as e:  # noqa: BLE001 - only out-of-memory means "does not fit"
            if is_oom(e):
                return False
            raise
        finally:
            del trainer, data
            free(self.device)

    def largest_batch(self, model_name: str, start: int, cap: int) -> int:
        batch, best = start, 0
        while batch <= cap and self.fits(model_name, batch):
            best, batch = batch, batch * 2
        if best == 0:
            raise RuntimeError(f"{model_name}: not even a batch of {start} fits")
        return best

    def flops_per_step(self, model_name: str, objective: str, batch: int) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        trainer = self._trainer(model_name, objective, batch, compile=False)
        data = self._batch(model_name, batch)
        trainer.train_step(*data)  # warm-up: lazy initialisations are not the step
        counter = FlopCounterMode(display=False)
        with counter:
            trainer.train_step(*data)
        del trainer, data
        free(self.device)
        return float(counter.get_total_flops())

    def run(self, model_name: str, objective: str, batch: int, compile: bool) -> tuple[float, float | None, str]:
        """(samples/s, peak GB, precision) of `steps` timed steps after warm-up (and compilation)."""
        trainer = self._trainer(model_name, objective, batch, compile)
        data = self._batch(model_name, batch)
        for _ in range(2):  # warm-up; compilation happens here
            trainer.train_step(*data)
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        for _ in range(self.steps):
            result = trainer.train_step(*data)
        sync(self.device)
        elapsed = time.perf_counter() - t0
        result.host_metrics()  # the values are real (and finite) at the end
        peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else None
        precision = trainer.precision
        del trainer, data
        free(self.device)
        return batch * self.steps / elapsed, peak, precision


def _web_like_jpegs(n: int, size=(500, 375), quality=90) -> list[bytes]:
    """Smooth gradients + shapes + mild noise: compresses like a photo, not like random noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    out = []
    w, h = size
    for k in range(n):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (k + 1) % 256), (yy * 2 + 40 * k) % 256, ((xx + yy) // 2) % 256], -1).astype(np.float32)
        base += rng.normal(0, 6, base.shape)
        im = Image.fromarray(base.clip(0, 255).astype("uint8"))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            draw.ellipse([x0, y0, x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 120))],
                         fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _preprocess_worker(args) -> int:
    jpegs, image_size, context_length, seconds, use_alip = args
    torch.set_num_threads(1)
    import numpy as np

    batch = {"key": np.array([f"k{i}" for i in range(len(jpegs))], dtype=object),
             "image": np.array(jpegs, dtype=object),
             "raw_text": np.array(["a photo of a red thing on the beach"] * len(jpegs), dtype=object),
             "caption": np.array(["a red circle"] * len(jpegs), dtype=object)}
    if use_alip:
        from alip.pretrain.data import TrainPreprocessor

        prep = TrainPreprocessor(image_size, context_length, train=True, seed=os.getpid())
        step = lambda epoch: prep({**batch, "epoch": np.full(len(jpegs), epoch)})  # noqa: E731
    else:  # no pyarrow on this machine: the same work with PIL + torchvision, without alip's data path
        from PIL import Image
        from torchvision import transforms as T

        crop = T.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.8, 1.25),
                                   interpolation=T.InterpolationMode.BICUBIC)

        def step(epoch):
            return [np.asarray(crop(Image.open(io.BytesIO(j)).convert("RGB"))) for j in jpegs]
    done, epoch, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step(epoch)
        done += len(jpegs)
        epoch += 1
    return done


def preprocess_rate(image_size: int, context_length: int, processes: int, seconds: float, n_jpegs: int) -> tuple[float, str]:
    try:
        import alip.pretrain.data  # noqa: F401  (needs pyarrow via alip.data)
        use_alip, note = True, "alip.pretrain.data.TrainPreprocessor"
    except ImportError as e:
        use_alip, note = False, f"PIL fallback ({e.name} missing)"
    jpegs = _web_like_jpegs(n_jpegs)
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with ctx.Pool(processes) as pool:
        done = sum(pool.map(_preprocess_worker, [(jpegs, image_size, context_length, seconds, use_alip)] * processes))
    return done / (time.perf_counter() - t0), f"{processes} processes, {note}, 500x375 q90 JPEGs"


def caption_rate(device: torch.device, tiny: bool, batch: int) -> tuple[float, str]:
    from transformers import BlipConfig, BlipForConditionalGeneration

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    encoder_hidden_size=32, vocab_size=1000, bos_token_id=3, pad_token_id=0, sep_token_id=2,
                    eos_token_id=2)
    else:  # Salesforce/blip-image-captioning-large's shapes
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=384, patch_size=16)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    encoder_hidden_size=1024, vocab_size=30524)
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text)).to(device, dtype).eval()
    pixels = torch.randn(batch, 3, vision["image_size"], vision["image_size"], device=device, dtype=dtype)
    kwargs = dict(num_beams=3, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with torch.inference_mode():
        model.generate(pixel_values=pixels, **kwargs)  # warm-up
        sync(device)
        reps = 1 if tiny else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            out = model.generate(pixel_values=pixels, **kwargs)
        sync(device)
    rate = batch * reps / (time.perf_counter() - t0)
    del model
    free(device)
    return rate, f"{'tiny' if tiny else 'BLIP-large-sized'} random model, {dtype}, beam 3, {out.shape[1] - 1} tokens, batch {batch}"


def serve_rates(device: torch.device, model_name: str, batch: int) -> list[Row]:
    from alip.model import create_model
    from alip.serving.encoder import Encoder

    torch.manual_seed(0)
    encoder = Encoder(create_model(model_name, device=device))
    size = encoder.model.image_size
    pixels = torch.randn(batch, 3, size, size)  # preprocessed, as the HTTP layer hands them over
    tokens = encoder.tokenize(texts(batch, random.Random(0), 3, 12))
    rows = []
    for what, fn, arg in (("image", encoder.encode_images, pixels), ("text", encoder.encode_texts, tokens)):
        fn(arg)  # warm-up
        reps, t0 = 3, time.perf_counter()
        for _ in range(reps):
            fn(arg)  # returns CPU tensors: includes the copies a request pays
        rows.append(Row("serve", f"{model_name} {what} embeddings", batch * reps / (time.perf_counter() - t0),
                        note=f"alip.serving.encoder.Encoder, batch {batch}"))
    del encoder
    free(device)
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'section':<11}{'config':<34}{'samples/s':>11}{'peak GB':>9}{'MFU':>7}  note", "-" * 110]
    for r in rows:
        mem = f"{r.peak_memory_gb:.1f}" if r.peak_memory_gb is not None else "-"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        lines.append(f"{r.section:<11}{r.config:<34}{r.samples_per_s:>11.1f}{mem:>9}{mfu:>7}  {r.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU CI)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd towers")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor; aot_eager with --tiny on CPU: inductor "
                         "needs minutes of C++ compilation per graph on a small CPU)")
    ap.add_argument("--models", default=None, help="comma-separated (default ViT-B-32,ViT-B-16; tiny: alip-micro,alip-tiny)")
    ap.add_argument("--start-batch", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per row")
    ap.add_argument("--budget-s", type=float, default=480, help="skip what would start after this many seconds")
    ap.add_argument("--json", default=None, help="also write the rows and the machine to this file")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    models = (args.models or ("alip-micro,alip-tiny" if tiny else "ViT-B-32,ViT-B-16")).split(",")
    start = args.start_batch or (4 if tiny else 128)
    cap = args.max_batch or (16 if tiny else 8192)
    steps = args.steps or (2 if tiny else 10)
    backend = args.compile_backend or ("aot_eager" if tiny and device.type == "cpu" else "inductor")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    print(f"[gpu_check] {name}, torch {torch.__version__}, {'tiny sizes' if tiny else 'full sizes'}", flush=True)
    peak = measured_peak(device, tiny)
    spec = next((v for k, v in SPEC_PEAK.items() if k in name), None)
    print(f"[gpu_check] measured matmul peak {peak / 1e12:.3g} TFLOP/s"
          + (f" (spec dense bf16 {spec / 1e12:.0f})" if spec else ""), flush=True)

    def over_budget(what: str) -> bool:
        spent = time.perf_counter() - t_start
        if spent > args.budget_s:
            print(f"[gpu_check] skipped {what}: {spent:.0f}s spent, budget {args.budget_s:.0f}s", flush=True)
            return True
        return False

    rows: list[Row] = []
    bench = TrainBench(device, steps, backend)
    best_train = 0.0
    for model_name in models:
        if over_budget(f"training {model_name}"):
            continue
        batch = bench.largest_batch(model_name, start, cap)
        print(f"[gpu_check] {model_name}: largest batch that fits {batch} (tried doubling from {start}, cap {cap})",
              flush=True)
        for objective in ("alip", "clip"):
            flops = bench.flops_per_step(model_name, objective, batch)
            for compiled in ((False, True) if args.compile else (False,)):
                label = f"{model_name} {objective.upper()}{' compiled' if compiled else ''}"
                if over_budget(label):
                    continue
                rate, mem, precision = bench.run(model_name, objective, batch, compiled)
                mfu = flops * rate / batch / peak
                best_train = max(best_train, rate)
                rows.append(Row("train", label, rate, mem, mfu,
                                f"batch {batch}, {precision}, {flops / batch / 1e9:.2f} GFLOP/sample"
                                + (f", MFU vs spec {100 * flops * rate / batch / spec:.1f}%" if spec else "")
                                + (f", {backend}" if compiled else "")))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        for objective in ("alip",):  # the ratio the issue asks for, per model
            a = [r for r in rows if r.config == f"{model_name} ALIP"]
            c = [r for r in rows if r.config == f"{model_name} CLIP"]
            if a and c:
                print(f"[gpu_check] {model_name}: ALIP/CLIP step time = {c[0].samples_per_s / a[0].samples_per_s:.2f}x",
                      flush=True)

    if not over_budget("preprocessing"):
        size, ctx = image_and_context(models[0])
        procs = os.cpu_count() or 1
        rate, note = preprocess_rate(224 if not tiny else size, 77 if not tiny else ctx, procs,
                                     seconds=2 if tiny else 20, n_jpegs=8 if tiny else 64)
        if best_train:
            note += f"; {rate / best_train:.2f}x the fastest training row (goal >= 1.5x)"
        rows.append(Row("preprocess", f"train data path, {procs} cores", rate, note=note))
    if not over_budget("captioning"):
        rate, note = caption_rate(device, tiny, batch=4 if tiny else 64)
        rows.append(Row("caption", "BLIP-large-sized generate", rate, note=note))
    if not over_budget("serving"):
        rows.extend(serve_rates(device, models[0], batch=8 if tiny else 256))

    print(f"\n[gpu_check] {name}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - t_start:.0f}s\n" + format_table(rows))
    report = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "measured_peak_flops": peak, "spec_peak_flops": spec, "rows": [asdict(r) for r in rows]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
