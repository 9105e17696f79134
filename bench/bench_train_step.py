"""Training-step time (forward + backward + AdamW) on CPU, every variant of a table measured side by side.

    .venv/bin/python bench/bench_train_step.py                 # ViT-B-32, batch 16, 3 timed rounds: ~5-6 min alone on 2 cores
    .venv/bin/python bench/bench_train_step.py --batch 32      # the issues' setting (ViT-B-32, batch 32): about twice as long
    .venv/bin/python bench/bench_train_step.py --model alip-tiny --batch 64 --repeats 5   # seconds
    .venv/bin/python bench/bench_train_step.py --compile       # adds torch.compile (inductor: minutes on CPU)

Measured 2026-11-29 with the defaults, alone on the 2-core CPU box (273 s; medians s/step):
    ALIP / CLIP 1.11x (4.83 / 4.35), official-style / ALIP 1.70x, short texts split / joint 1.02x (auto: joint),
    long raw texts joint / split 1.39x, ALIP(split) / CLIP-long 1.07x, grad-checkpointing / eager 1.15x,
    4 micro-batches / full batch 1.58x (9.04 / 5.73); bf16 skipped (AVX2-only CPU).

The default batch is 16, not the issues' 32: about 50 steps of ViT-B-32 (a warm-up and 3 timed
rounds of every variant) at batch 32 take over 10 minutes on a 2-core CPU; at 16 the run fits in
about 5-6. Every variant sees the same batch, so the ratios are comparable; `--batch 32` gives the
big setting.

Each table is measured on its own and printed as soon as it is done: one warm-up round (variants not
run before), then `--repeats` timed rounds interleaved A B C A B C ... so machine noise hits every
variant of the table alike; a line per round shows each variant's step time as it finishes; the
median is reported. Tables 3 and 4 re-measure `alip` beside their variants (side by side, not
compared with a time taken minutes earlier). Same model weights and batch throughout.
  1. text encoding, alt-text-like texts of 8-22 tokens for both raw text and caption:
       alip           ALIP, trimmed text encoding ("auto": alip.model.plan_text_passes picks joint/split by length)
       clip           plain CLIP (raw text only), trimmed
       alip-official  "official style": two separate untrimmed full-context text passes
       alip-split/-joint  ALIP forced to the pass mode "auto" did NOT pick: the cost of a second pass
  2. text passes, LONG raw alt-texts (up to the full context) + short captions (<= 18 tokens):
       joint          raw + caption in one pass trimmed to the longer (the long raw text pads every caption)
       split          two passes, each trimmed to its own length (what "auto" picks here: printed)
       clip-long      CLIP on the same long raw texts: ALIP(split) / CLIP is the paper's "+40% FLOPs" cost
  3. options, on table 1's batch: gradient checkpointing, bf16 autocast, [torch.compile] vs fp32 eager.
  4. exact gradient accumulation (GradCache): 4 micro-batches vs one full batch.
Targets: alip <= 1.2x clip, official >= 1.8x alip (issue 2); ALIP(split)/CLIP <= 1.15x (issue 14);
accumulation ~1.3x (one extra forward, issue 13).
On CPU, checkpointing costs time (recompute; it saves memory, a GPU option). bf16 autocast is measured
only where the CPU has native bf16 matrix instructions (AVX512-BF16 / AMX / ARM BF16): elsewhere
PyTorch's bf16 matmul fallback is 10-30x slower than fp32 (one ViT-B-32 step takes minutes), a
figure about the fallback, not about bf16; the row is skipped with the reason printed
(`--bf16 always` forces it). bench/gpu_check.py measures the bf16 step on a GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alip.model import ALIPModel, create_model, eot_length, get_tokenizer, plan_text_passes
from alip.training import ALIPTrainer, TrainConfig

WORDS = ("red blue green small large circle square star striped dotted photo picture trip beach day "
         "left right top bottom center gray background object thing with on the of a").split()

# /proc/cpuinfo flags of CPUs whose bf16 matmuls run on native instructions (x86: AVX512-BF16,
# AMX; Arm: the BF16 extension, listed as "bf16" in the Features line).
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def texts(n: int, rng: random.Random, low: int, high: int) -> list[str]:
    # common words are one BPE token each; + SOT/EOT
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def cpu_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 matrix instructions (False where /proc/cpuinfo is unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS)


class Passes(torch.nn.Module):
    """The model with a fixed way of encoding the texts (trainer.model swaps between these)."""

    def __init__(self, model: ALIPModel, text_passes: str = "auto", official: bool = False):
        super().__init__()
        self.module = model
        self.text_passes = text_passes
        self.official = official

    def forward(self, images, raw_tokens, caption_tokens, **lengths):
        m = self.module
        if not self.official:
            return m(images, raw_tokens, caption_tokens, text_passes=self.text_passes, **lengths)
        # The official code's forward: raw text and caption in two untrimmed passes.
        raw = m.encode_text(raw_tokens, trim=False) if raw_tokens is not None else None
        cap = m.encode_text(caption_tokens, trim=False) if caption_tokens is not None else None
        return {"image": m.encode_image(images), "raw": raw, "caption": cap, "logit_scale": m.logit_scale.exp()}


@dataclass
class Variant:
    name: str
    trainer: str  # key of the trainer it steps (trainers, i.e. optimiser states, are shared: memory)
    batch: str = "short"  # which texts
    text_passes: str = "auto"
    official: bool = False
    grad_checkpointing: bool = False


@dataclass
class Table:
    title: str
    variants: list[Variant]
    ref: str  # the row the others are divided by
    times: dict[str, list[float]] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.times.items()}


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per table (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4, help="for the accumulation comparison")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd towers (slow to compile on CPU)")
    ap.add_argument("--bf16", choices=("auto", "always", "never"), default="auto",
                    help="auto: time the bf16 row only on a CPU with native bf16 instructions")
    ap.add_argument("--json", type=Path, help="also write the medians and ratios here")
    args = ap.parse_args(argv)
    if args.batch < 2:
        ap.error("--batch must be >= 2 (contrastive learning needs negatives)")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.micro_batches < 2 or args.batch % args.micro_batches or args.batch // args.micro_batches < 1:
        ap.error(f"--batch {args.batch} must be a multiple of --micro-batches {args.micro_batches} (>= 2)")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    tok = get_tokenizer(args.model)
    torch.manual_seed(0)
    model = create_model(args.model)
    size, ctx = model.image_size, model.context_length
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)  # what the data path ships
    short_raw, short_cap = tok(texts(args.batch, rng, 6, 20)), tok(texts(args.batch, rng, 6, 20))
    long_raw = tok(texts(args.batch, rng, max(6, ctx * 2 // 3), ctx))  # alt-texts cut at the context
    long_cap = tok(texts(args.batch, rng, 6, min(16, ctx - 2)))  # generated captions: <= 16-24 tokens
    data = {"short": (short_raw, short_cap), "long": (long_raw, long_cap)}
    lengths = {k: (eot_length(r), eot_length(c)) for k, (r, c) in data.items()}
    short_auto, long_auto = plan_text_passes(*lengths["short"]), plan_text_passes(*lengths["long"])
    short_other = "split" if short_auto == "joint" else "joint"
    print(f"model {args.model}, batch {args.batch}, {args.threads} threads, {args.repeats} timed round(s) per table "
          f"after a warm-up; trim lengths: short raw {lengths['short'][0]} / caption {lengths['short'][1]} "
          f"(auto: {short_auto}), long raw {lengths['long'][0]} / caption {lengths['long'][1]} (auto: {long_auto}) "
          f"(context {ctx})", flush=True)

    native_bf16 = cpu_native_bf16()
    time_bf16 = args.bf16 == "always" or (args.bf16 == "auto" and native_bf16)
    if not time_bf16:
        why = ("--bf16 never" if args.bf16 == "never" else
               f"this CPU ({platform.machine()}, torch capability {torch.backends.cpu.get_cpu_capability()}) has no "
               "native bf16 matmul instructions (AVX512-BF16/AMX/ARM BF16): PyTorch's fallback is 10-30x slower "
               "than fp32, a figure about the fallback, not bf16; bench/gpu_check.py measures bf16 on a GPU; "
               "--bf16 always forces the row")
        print(f"bf16 row skipped: {why}", flush=True)

    mb = args.micro_batches
    tables = [
        Table("1. text encoding (short alt-text-like texts)",
              [Variant("alip", "alip"), Variant("clip", "clip"), Variant("alip-official", "alip", official=True),
               Variant(f"alip-{short_other}", "alip", text_passes=short_other)], ref="clip"),
        Table("2. text passes (long raw alt-texts + short captions)",
              [Variant("joint", "alip", batch="long", text_passes="joint"),
               Variant("split", "alip", batch="long", text_passes="split"),
               Variant("clip-long", "clip", batch="long")], ref="clip-long"),
        Table("3. options (short texts)",
              [Variant("alip", "alip"), Variant("grad-checkpointing", "alip", grad_checkpointing=True)]
              + ([Variant("bf16", "bf16")] if time_bf16 else [])
              + ([Variant("compile", "compile")] if args.compile else []), ref="alip"),
        Table(f"4. exact gradient accumulation ({mb} micro-batches of {args.batch // mb})",
              [Variant("alip", "alip"), Variant(f"accumulate-{mb}", "accum")], ref="alip"),
    ]
    # Steps per trainer, for its LR schedule (at most one warm-up + the timed rounds per variant).
    steps: dict[str, int] = {}
    for t in tables:
        for v in t.variants:
            steps[v.trainer] = steps.get(v.trainer, 0) + args.repeats + 1
    base = dict(model=args.model, global_batch_size=args.batch, precision="fp32")
    configs = {
        "alip": TrainConfig(**base), "clip": TrainConfig(**base, objective="clip"),
        "bf16": TrainConfig(**{**base, "precision": "bf16"}),
        "accum": TrainConfig(**base, micro_batch_size=args.batch // mb),
        "compile": TrainConfig(**base, compile=True),
    }
    trainers = {}
    for key, n in steps.items():
        # one weight copy per trainer kind that changes the module (compile), else shared weights
        m = create_model(args.model) if key == "compile" else model
        trainers[key] = ALIPTrainer(configs[key], m, total_steps=max(n, 20))  # OneCycleLR: pct_start * total > 1
    wrappers = {v.name: Passes(trainers[v.trainer].unwrapped, v.text_passes, v.official)
                for t in tables for v in t.variants}

    def step(v: Variant) -> float:
        trainer = trainers[v.trainer]
        trainer.model = wrappers[v.name]
        trainer.unwrapped.set_grad_checkpointing(v.grad_checkpointing)
        t0 = time.perf_counter()
        trainer.train_step(images, *data[v.batch])
        return time.perf_counter() - t0

    def run_round(label: str, variants: list[Variant]) -> dict[str, float]:
        """One step of each variant, each time printed as soon as it is measured."""
        print(f"  {label}:", end="", flush=True)
        times = {}
        for i, v in enumerate(variants):
            times[v.name] = step(v)
            print(f"{',' if i else ''} {v.name} {times[v.name]:.2f} s", end="", flush=True)
        print(flush=True)
        return times

    warmed: set[str] = set()
    results: dict[str, dict[str, float]] = {}
    for table in tables:
        print(f"\n{table.title}", flush=True)
        cold = [v for v in table.variants if v.name not in warmed]
        if cold:  # first steps allocate (and compile): not timed
            run_round("warm-up", cold)
            warmed.update(v.name for v in cold)
        for rnd in range(args.repeats):
            for name, s in run_round(f"round {rnd + 1}/{args.repeats}", table.variants).items():
                table.times.setdefault(name, []).append(s)
        med = table.medians()
        results[table.title.split(".")[0]] = med
        print(f"{'variant':<22}{'median s/step':>15}{'vs ' + table.ref:>16}")
        for v in table.variants:
            print(f"{v.name:<22}{med[v.name]:>15.3f}{med[v.name] / med[table.ref]:>15.2f}x", flush=True)
        print(f"({time.perf_counter() - start:.0f} s so far)", flush=True)

    t1, t2, t3, t4 = (results[str(i)] for i in range(1, 5))
    split_over_joint = (t1[f"alip-{short_other}"] / t1["alip"]) ** (1 if short_other == "split" else -1)
    ratios = {
        "alip/clip": t1["alip"] / t1["clip"],
        "official/alip": t1["alip-official"] / t1["alip"],
        "short: split/joint": split_over_joint,
        "long: joint/split": t2["joint"] / t2["split"],
        "long: alip(split)/clip": t2["split"] / t2["clip-long"],
        "grad-checkpointing/eager": t3["grad-checkpointing"] / t3["alip"],
        f"accumulate-{mb}/full": t4[f"accumulate-{mb}"] / t4["alip"],
    }
    if time_bf16:
        ratios["bf16/fp32"] = t3["bf16"] / t3["alip"]
    if args.compile:
        ratios["compile/eager"] = t3["compile"] / t3["alip"]
    print(f"\nALIP / CLIP = {ratios['alip/clip']:.2f}x (target <= 1.2x); "
          f"official / ALIP = {ratios['official/alip']:.2f}x (target >= 1.8x); "
          f"short texts: split / joint = {ratios['short: split/joint']:.2f}x (auto picks {short_auto})")
    print(f"long raw texts: joint / split = {ratios['long: joint/split']:.2f}x, "
          f"ALIP(split) / CLIP = {ratios['long: alip(split)/clip']:.2f}x (target <= 1.15x), auto picks {long_auto}")
    print("options: grad-checkpointing / eager = "
          f"{ratios['grad-checkpointing/eager']:.2f}x (recompute: a memory option), "
          + (f"bf16 / fp32 = {ratios['bf16/fp32']:.2f}x" if time_bf16 else "bf16 not timed on this CPU (see above)")
          + (f", compile / eager = {ratios['compile/eager']:.2f}x" if args.compile else ""))
    print(f"accumulation: {mb} micro-batches / full batch = "
          f"{ratios[f'accumulate-{mb}/full']:.2f}x (one extra forward: ~1.3x expected)")
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
            "bf16_timed": time_bf16, "cpu_native_bf16": native_bf16, "auto": {"short": short_auto, "long": long_auto},
            "lengths": lengths, "medians": results, "ratios": ratios}, indent=2))
    return ratios


if __name__ == "__main__":
    main()
