"""Training-step time (forward + backward + AdamW) on CPU, every variant measured side by side in one run.

    .venv/bin/python bench/bench_train_step.py                 # ViT-B-32, batch 32 (the issues' setting)
    .venv/bin/python bench/bench_train_step.py --model alip-tiny --batch 64 --repeats 5
    .venv/bin/python bench/bench_train_step.py --compile       # adds torch.compile (inductor: minutes on CPU)

Tables (same model weights, same batch; rounds are interleaved A B C A B C ... so machine noise hits
every variant alike; the median is reported):
  1. text encoding, alt-text-like texts of 8-25 tokens for both raw text and caption:
       alip           ALIP, trimmed text encoding (lengths decide joint/split, alip.model.plan_text_passes)
       clip           plain CLIP (raw text only), trimmed
       alip-official  "official style": two separate untrimmed full-context text passes
  2. text passes, LONG raw alt-texts (up to the full context) + short captions (<= 18 tokens):
       joint          raw + caption in one pass trimmed to the longer (the long raw text pads every caption)
       split          two passes, each trimmed to its own length (what "auto" picks here)
       clip-long      CLIP on the same long raw texts: ALIP(split) / CLIP is the paper's "+40% FLOPs" cost
     and the split/joint ratio on the SHORT texts of table 1 (equal lengths: the cost of a second pass).
  3. options, on table 1's batch: gradient checkpointing, bf16 autocast, [torch.compile] vs fp32 eager.
  4. exact gradient accumulation: 4 micro-batches (feature caching) vs one full batch.
Targets: alip <= 1.2x clip, official >= 1.8x alip (issue 2); accumulation ~1.3x (one extra forward).
On CPU, bf16 autocast and checkpointing cost time (no bf16 matrix units, recompute); they are GPU options.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from alip.model import ALIPModel, create_model, eot_length, get_tokenizer
from alip.training import ALIPTrainer, TrainConfig

WORDS = ("red blue green small large circle square star striped dotted photo picture trip beach day "
         "left right top bottom center gray background object thing with on the of a").split()


def texts(n: int, rng: random.Random, low: int, high: int) -> list[str]:
    # common words are one BPE token each; + SOT/EOT
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


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
    times: list[float] = field(default_factory=list)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4, help="for the accumulation comparison")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd towers (slow to compile on CPU)")
    args = ap.parse_args(argv)
    if args.batch % args.micro_batches:
        ap.error(f"--batch {args.batch} must be a multiple of --micro-batches {args.micro_batches}")
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
    print(f"model {args.model}, batch {args.batch}, {args.threads} threads, {args.repeats} timed rounds; "
          f"trim lengths: short raw {eot_length(short_raw)} / caption {eot_length(short_cap)}, "
          f"long raw {eot_length(long_raw)} / caption {eot_length(long_cap)} (context {ctx})", flush=True)

    variants = [
        Variant("alip", "alip"), Variant("clip", "clip"), Variant("alip-official", "alip", official=True),
        Variant("short-joint", "alip", text_passes="joint"), Variant("short-split", "alip", text_passes="split"),
        Variant("joint", "alip", batch="long", text_passes="joint"),
        Variant("split", "alip", batch="long", text_passes="split"),
        Variant("auto", "alip", batch="long"),
        Variant("clip-long", "clip", batch="long"),
        Variant("grad-checkpointing", "alip", grad_checkpointing=True),
        Variant("bf16", "bf16"),
        Variant(f"accumulate-{args.micro_batches}", "accum"),
    ]
    if args.compile:
        variants.append(Variant("compile", "compile"))
    rounds = args.repeats + 1  # round 0 is warm-up (and compilation)
    steps = {k: rounds * sum(v.trainer == k for v in variants) for k in {v.trainer for v in variants}}
    base = dict(model=args.model, global_batch_size=args.batch, precision="fp32")
    configs = {
        "alip": TrainConfig(**base), "clip": TrainConfig(**base, objective="clip"),
        "bf16": TrainConfig(**{**base, "precision": "bf16"}),
        "accum": TrainConfig(**base, micro_batch_size=args.batch // args.micro_batches),
        "compile": TrainConfig(**base, compile=True),
    }
    trainers = {}
    for key, n in steps.items():
        # one weight copy per trainer kind that changes the module (compile), else shared weights
        m = create_model(args.model) if key == "compile" else model
        trainers[key] = ALIPTrainer(configs[key], m, total_steps=n)
    wrappers = {v.name: Passes(trainers[v.trainer].unwrapped, v.text_passes, v.official) for v in variants}

    for rnd in range(rounds):
        for v in variants:
            trainer = trainers[v.trainer]
            trainer.model = wrappers[v.name]
            trainer.unwrapped.set_grad_checkpointing(v.grad_checkpointing)
            t0 = time.perf_counter()
            trainer.train_step(images, *data[v.batch])
            if rnd:
                v.times.append(time.perf_counter() - t0)
        print(f"  round {rnd + 1}/{rounds} done" + (" (warm-up)" if rnd == 0 else ""), flush=True)
    med = {v.name: statistics.median(v.times) for v in variants}

    def table(title, names, ref):
        print(f"\n{title}\n{'variant':<22}{'median s/step':>15}{'vs ' + ref:>16}")
        for k in names:
            print(f"{k:<22}{med[k]:>15.3f}{med[k] / med[ref]:>15.2f}x")

    table("1. text encoding (short alt-text-like texts)", ["alip", "clip", "alip-official"], "clip")
    table("2. text passes (long raw alt-texts + short captions)", ["joint", "split", "auto", "clip-long"], "clip-long")
    table("3. options (short texts)", ["alip", "grad-checkpointing", "bf16"] + (["compile"] if args.compile else []), "alip")
    table(f"4. exact gradient accumulation ({args.micro_batches} micro-batches of {args.batch // args.micro_batches})",
          ["alip", f"accumulate-{args.micro_batches}"], "alip")
    ratios = {
        "alip/clip": med["alip"] / med["clip"],
        "official/alip": med["alip-official"] / med["alip"],
        "long: joint/split": med["joint"] / med["split"],
        "long: alip(split)/clip": med["split"] / med["clip-long"],
        "long: alip(auto)/clip": med["auto"] / med["clip-long"],
        "short: split/joint": med["short-split"] / med["short-joint"],
        "grad-checkpointing/eager": med["grad-checkpointing"] / med["alip"],
        "bf16/fp32": med["bf16"] / med["alip"],
        f"accumulate-{args.micro_batches}/full": med[f"accumulate-{args.micro_batches}"] / med["alip"],
    }
    if args.compile:
        ratios["compile/eager"] = med["compile"] / med["alip"]
    print(f"\nALIP / CLIP = {ratios['alip/clip']:.2f}x (target <= 1.2x); "
          f"official / ALIP = {ratios['official/alip']:.2f}x (target >= 1.8x)")
    print(f"long raw texts: joint / split = {ratios['long: joint/split']:.2f}x, "
          f"ALIP(split) / CLIP = {ratios['long: alip(split)/clip']:.2f}x (target <= 1.15x), "
          f"auto picks {'split' if abs(med['auto'] - med['split']) <= abs(med['auto'] - med['joint']) else 'joint'}; "
          f"short texts: split / joint = {ratios['short: split/joint']:.2f}x")
    print(f"accumulation: {args.micro_batches} micro-batches / full batch = "
          f"{ratios[f'accumulate-{args.micro_batches}/full']:.2f}x (one extra forward: ~1.3x expected)")
    return ratios


if __name__ == "__main__":
    main()
