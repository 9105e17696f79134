"""Training-step time (forward + backward + AdamW) on CPU, measured side by side in one run.

    .venv/bin/python bench/bench_train_step.py                 # ViT-B-32, batch 32 (the issue's setting)
    .venv/bin/python bench/bench_train_step.py --model alip-tiny --batch 64 --repeats 5

Variants, same model weights and the same batch (texts of 8-25 tokens, like alt-texts/captions):
  alip          ALIP with trimmed text encoding (raw + caption in one text pass)
  clip          plain CLIP (raw text only), trimmed
  alip-official "official style" ALIP: two separate untrimmed 77-token text passes
Rounds are interleaved (A B C A B C ...) so machine noise hits every variant alike; the median is
reported. Targets (issue 2): alip <= 1.2x clip, official >= 1.8x alip.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from alip.model import ALIPModel, create_model, get_tokenizer
from alip.training import ALIPTrainer, TrainConfig

WORDS = ("red blue green small large circle square star striped dotted photo picture trip beach day "
         "left right top bottom center gray background object thing with on the of a").split()


def texts(n: int, rng: random.Random) -> list[str]:
    # 8-25 BPE tokens incl. SOT/EOT: 6-20 common words.
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) for _ in range(n)]


class OfficialStyle(torch.nn.Module):
    """The official code's forward: raw text and caption encoded in two untrimmed passes."""

    def __init__(self, model: ALIPModel):
        super().__init__()
        self.module = model

    def forward(self, images, raw_tokens, caption_tokens):
        m = self.module
        raw = m.encode_text(raw_tokens, trim=False) if raw_tokens is not None else None
        cap = m.encode_text(caption_tokens, trim=False) if caption_tokens is not None else None
        return {"image": m.encode_image(images), "raw": raw, "caption": cap, "logit_scale": m.logit_scale.exp()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    torch.manual_seed(0)
    tok = get_tokenizer(args.model)
    size = create_model(args.model).image_size
    images = torch.randn(args.batch, 3, size, size)
    raw, cap = tok(texts(args.batch, rng)), tok(texts(args.batch, rng))
    lengths = (raw.argmax(-1) + 1).tolist() + (cap.argmax(-1) + 1).tolist()
    print(f"model {args.model}, batch {args.batch}, text tokens {min(lengths)}-{max(lengths)} "
          f"(context {raw.shape[1]}), {args.threads} threads, {args.repeats} timed rounds")

    variants = {}
    for name, objective, official in (("alip", "alip", False), ("clip", "clip", False),
                                      ("alip-official", "alip", True)):
        torch.manual_seed(0)
        model = create_model(args.model)
        wrapped = OfficialStyle(model) if official else model
        cfg = TrainConfig(model=args.model, objective=objective, global_batch_size=args.batch, precision="fp32")
        variants[name] = ALIPTrainer(cfg, wrapped, total_steps=args.repeats + 2)
    times = {k: [] for k in variants}
    for rnd in range(args.repeats + 1):  # round 0 is warm-up
        for name, trainer in variants.items():
            t0 = time.perf_counter()
            trainer.train_step(images, raw, cap)
            if rnd:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'variant':<15}{'median s/step':>15}{'vs clip':>10}{'vs alip':>10}")
    for k, v in med.items():
        print(f"{k:<15}{v:>15.3f}{v / med['clip']:>9.2f}x{v / med['alip']:>9.2f}x")
    print(f"ALIP / CLIP = {med['alip'] / med['clip']:.2f}x (target <= 1.2x); "
          f"official / ALIP = {med['alip-official'] / med['alip']:.2f}x (target >= 1.8x)")


if __name__ == "__main__":
    main()
