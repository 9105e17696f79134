"""Learning benchmark: ALIP vs its baselines and ablations on the built-in world, over several seeds.

    .venv/bin/python bench/bench_learning.py --seeds 0 1 2 --markdown learning_table.md   # the table in docs/benchmarks.md
    .venv/bin/python bench/bench_learning.py --seeds 0 --objectives oracle,alip --steps 100  # quick look

Objectives (alip.loss.ALIPLoss, plus the oracle):
    alip         raw text (W_s * W_t) + caption (W_s * W_c): the paper
    clip         raw text only, unit weights (the baseline)
    caption      caption only, unit weights
    alip_no_lcg  ALIP with W_s = 1 (no language consistency gate)
    alip_no_dcg  ALIP with W_t = W_c = 1 (no description consistency gate)
    oracle       the world's ground-truth description (names shape, colour AND pattern) as the only
                 text, unit weights: the per-task ceiling of this model, data and step budget.
For one seed, every objective sees the same data (world seed = run seed), the same captions (the
built-in captioner), the same initial weights, the same batch order and augmentation draws, the same
steps and hyperparameters: only the objective differs, so ALIP - X is a paired difference per seed.
Runs are single-threaded processes, `--workers` (default 2: both cores) at a time; no Ray: this
measures the method, not the cluster. Reports zero-shot top-1 on the held-out world splits (chance
shape 16.7, colour 16.7, colour_shape 2.8, pattern 25), mean +- std (sample std) over seeds.

Time budget (defaults: 6 objectives x 3 seeds, alip-tiny, 300 steps x batch 128). Measured at 1
thread on the shared 2-core box under load (CPU seconds, so contention inflates rather than hides
cost): 1.6 s per step for a two-path objective (ALIP and its ablations), 1.1-1.3 s for a one-path
one (CLIP, caption, oracle), ~10 s per zero-shot evaluation, ~3 s per 256 images captioned. That is
18 runs = 3 x 300 x (3 x 1.6 + 3 x 1.25) s = 7700 CPU s, ~64 min on two cores, plus ~5 min for the
data (3 worlds of 10,000 captioned on both cores) and evaluations: ~70 min projected, alone, under
the 90 min budget. The old default of 600 steps would project to ~2 h for this set of runs.

Is the benchmark able to show anything? The oracle check. Oracle alone, seed 0, 10,000 samples,
alip-tiny (64 px, 8 px patches), 200 steps x 128, 1 thread: zero-shot shape 23.8, colour 92.3,
colour_shape 17.0, PATTERN 38.7 (chance 25; +13.7 points, ~7.6 binomial standard errors over 600
held-out images). So the pattern IS learnable by this model and resolution from text that names it,
no rendering change was needed. At the default 300 steps (seed 1): shape 21.8, colour 100,
colour_shape 17.3, PATTERN 49.2 (1.21 CPU s per step). Caveat: even the oracle learns shape only
modestly at 200-300 steps (22-24 vs chance 16.7), so the shape gaps have a low ceiling at this
budget. (Measured on the loaded box; the run alone, in the table, gives the oracle over 3 seeds.)

Measured (the first command above, alone on the 2-core box; 59.6 min in all, 54.2 min of training):
zero-shot top-1 %, mean +- std over seeds 0, 1, 2        shape        colour       colour_shape  pattern
    alip                                                 22.3 +- 1.2  100.0 +- 0.0  18.9 +- 1.9   25.6 +- 1.0
    clip                                                 16.1 +- 0.5   99.9 +- 0.1  17.4 +- 1.3   24.2 +- 2.3
    caption                                              22.0 +- 1.1   99.8 +- 0.1  16.1 +- 0.4   25.3 +- 0.6
    alip_no_lcg                                          22.7 +- 0.7   99.9 +- 0.1  18.8 +- 0.3   26.7 +- 1.2
    alip_no_dcg                                          22.6 +- 1.3  100.0 +- 0.0  19.2 +- 2.1   26.4 +- 1.3
    oracle                                               22.2 +- 0.3   98.8 +- 1.5  16.2 +- 1.0   48.5 +- 0.7
ALIP - CLIP: shape +6.3 +- 1.5 (3/3 seeds), colour_shape +1.6 +- 0.7 (3/3). ALIP vs caption-only and
vs either ablation: within noise on every task (docs/benchmarks.md says so). Only the oracle learns the pattern.

The web-like world (issue 25), alone, 49.9 min (46.4 of training):
    .venv/bin/python bench/bench_learning.py --preset web-like --seeds 0 1 2
zero-shot top-1 %, mean +- std (3 seeds)     shape        colour        colour_shape  pattern      average
    alip                                     16.8 +- 0.8  100.0 +- 0.0  16.7 +- 0.8   27.4 +- 2.8  40.2 +- 0.9
    clip                                     16.9 +- 0.4   99.8 +- 0.3  17.8 +- 1.4   56.6 +- 3.6  47.8 +- 1.2
    caption                                  17.5 +- 1.6   91.7 +- 13.0 15.5 +- 2.5   23.6 +- 0.7  37.1 +- 3.7
    alip_no_lcg / alip_no_dcg average 41.9 +- 2.2 / 40.8 +- 0.6; oracle 46.5 +- 0.6
ALIP - CLIP average -7.6 +- 1.8 (0/3 seeds), all of it the pattern; ALIP - caption +3.1 +- 4.2 (2/3). The
gate-accuracy table (printed last) says why: at the end W_s < 1 flags unrelated raw texts with 20% precision,
below their 30% base rate (docs/benchmarks.md#a-web-like-world-when-the-gates-matter).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python bench/bench_learning.py` from anywhere
    sys.path.insert(0, str(ROOT))

OBJECTIVES = ("alip", "clip", "caption", "alip_no_lcg", "alip_no_dcg", "oracle")
TWO_PATH = ("alip", "alip_no_lcg", "alip_no_dcg")
TASKS = ("shape", "colour", "colour_shape", "pattern")
CHANCE = {"shape": 100 / 6, "colour": 100 / 6, "colour_shape": 100 / 36, "pattern": 25.0}
COLUMNS = TASKS + ("average",)  # average: the mean top-1 over the four tasks, per run
CHANCE["average"] = sum(CHANCE[t] for t in TASKS) / len(TASKS)
PROBE = 2048  # training samples the gate-accuracy table is measured on (the first PROBE of each seed's data)
PHASES = ("early", "middle", "end")  # gate accuracy after 10%, 50% and 100% of the steps


@dataclass(frozen=True)
class BenchConfig:
    """What every run of one benchmark shares (all but the objective and the seed)."""

    n: int = 10000
    noise: float = 0.5
    specificity: float = 0.0  # alip.data.world.related_text: how much related raw texts name
    steps: int = 300  # fits the 90-minute budget for 18 runs on 2 cores (see the docstring)
    batch: int = 128
    lr: float = 1e-3
    model: str = "alip-tiny"
    eval_samples: int = 600
    threads: int = 1  # torch threads per run
    captioner: str = "builtin"
    preset: str = "default"  # alip.data.world_presets: sets noise, specificity and captioner


# ----------------------------------------------------------------------------- data

def build_data(cfg: BenchConfig, seed: int, out_dir: Path, threads: int = 1) -> Path:
    """World of `seed`, captioned once, tokenised for every objective; saved so that every run (in
    any process) reads byte-identical inputs. Runs before any training, so it may use every core."""
    import torch

    from alip.captioners import load_captioner
    from alip.data.images import decode_image
    from alip.data.world import world_table
    from alip.data.world_truth import truth_columns
    from alip.model import get_tokenizer

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    table = world_table(cfg.n, noise=cfg.noise, seed=seed, specificity=cfg.specificity)
    images = [decode_image(b).convert("RGB") for b in table.column("image").to_pylist()]
    captioner = load_captioner(cfg.captioner)
    captions: list[str] = []
    for i in range(0, cfg.n, 256):
        captions += captioner.caption(images[i:i + 256])
    tok = get_tokenizer(cfg.model)
    related = np.array(table.column("raw_text_related").to_pylist())
    labels = table.select(["shape", "colour", "pattern"]).to_pylist()
    truth = truth_columns(table.column("raw_text").to_pylist(), captions, labels, related)
    path = out_dir / f"world_seed{seed}.npz"
    np.savez(path, images=np.stack([np.asarray(im) for im in images]),
             raw=tok(table.column("raw_text").to_pylist()).numpy(),
             caption=tok(captions).numpy(),
             oracle=tok(table.column("description").to_pylist()).numpy(),
             **{k: np.array(truth[k], dtype=bool) for k in ("raw_text_unrelated", "caption_wrong", "raw_text_adds")})
    print(f"data seed {seed}: {cfg.n} samples ({1 - related.mean():.0%} unrelated raw text), captioned by "
          f"{captioner.name} in {time.perf_counter() - t0:.0f}s; {describe_truth(truth)}; e.g. "
          f"raw={table.column('raw_text')[0]!s:.40} | cap={captions[0]!r} | oracle={table.column('description')[0]!s}",
          flush=True)
    return path


def describe_truth(truth: dict) -> str:
    """What the texts of one seed's data get right: the world knobs, as measured."""
    def share(column: str, attribute: str, value: str) -> float:
        return float(np.mean([f"{attribute}={value}" in t for t in truth[column]]))

    return (f"captions wrong {np.mean(truth['caption_wrong']):.0%} (colour named {share('caption_truth', 'colour', 'right') + share('caption_truth', 'colour', 'wrong'):.0%}); "
            f"related raw texts naming the pattern {share('raw_text_truth', 'pattern', 'right') / max(1e-9, 1 - np.mean(truth['raw_text_unrelated'])):.0%}; "
            f"raw text right where the caption is not {np.mean(truth['raw_text_adds']):.0%}")


@lru_cache(maxsize=3)  # a worker may train every seed; ~150 MB of small images per seed
def _load_data(path: str):
    from PIL import Image
    import torch

    d = np.load(path)
    images = [Image.fromarray(a) for a in d["images"]]
    truth = {k: d[k] for k in ("raw_text_unrelated", "caption_wrong", "raw_text_adds")}
    return images, torch.from_numpy(d["raw"]), torch.from_numpy(d["caption"]), torch.from_numpy(d["oracle"]), truth


def probe_gates(model, trainer, images, raw, cap, truth: dict) -> dict:
    """The gate-accuracy table on the first PROBE training samples, with the trainer's momentum means
    frozen (exactly what `alip explore` computes on an export: alip.explore.scoring.gate_scores)."""
    import torch

    from alip.explore.scoring import GateSettings, gate_accuracy, gate_scores
    from alip.gates import GateState
    from alip.model import image_transform

    k = min(PROBE, len(images))
    transform = image_transform(model, train=False)
    model.eval()
    with torch.no_grad():
        img = torch.cat([model.encode_image(torch.stack([transform(im) for im in images[i:i + 512]]))
                         for i in range(0, k, 512)])
        raw_f = torch.cat([model.encode_text(raw[i:i + 512]) for i in range(0, k, 512)])
        cap_f = torch.cat([model.encode_text(cap[i:i + 512]) for i in range(0, k, 512)])
    model.train()
    norm = torch.nn.functional.normalize
    settings = GateSettings(GateState.from_dict(trainer.gate_state.to_dict()), trainer.cfg.gate_sharpness)
    scores = gate_scores(norm(img, dim=-1), norm(raw_f, dim=-1), {"caption": norm(cap_f, dim=-1)}, settings)
    acc = gate_accuracy(scores["w_s__caption"], scores["w_t__caption"], scores["w_c__caption"],
                        truth["raw_text_unrelated"][:k], truth["caption_wrong"][:k], truth["raw_text_adds"][:k])
    return {"step": trainer.step, **acc}


# ----------------------------------------------------------------------------- one run

def train_one(objective: str, seed: int, data_path: str, cfg: BenchConfig) -> dict:
    """Train one objective on one seed's data and evaluate it zero-shot. Runs in a worker process."""
    import torch

    from alip.eval.zeroshot import evaluate_world_zeroshot
    from alip.model import create_model, image_transform
    from alip.training import ALIPTrainer, TrainConfig

    torch.set_num_threads(cfg.threads)
    images, raw, cap, oracle, truth = _load_data(data_path)
    if objective == "oracle":
        # The ceiling: plain contrastive training on the ground-truth text, through the same code.
        loss_objective, raw = "clip", oracle
    else:
        loss_objective = objective
    torch.manual_seed(seed)  # same initial weights for every objective of a seed
    model = create_model(cfg.model)
    tcfg = TrainConfig(model=cfg.model, objective=loss_objective, global_batch_size=cfg.batch, lr=cfg.lr,
                       max_steps=cfg.steps, precision="fp32", seed=seed)
    trainer = ALIPTrainer(tcfg, model, total_steps=cfg.steps)
    transform = image_transform(model, train=True)
    order = np.random.default_rng(seed)
    perm, pos = order.permutation(len(images)), 0
    t0, last, gates = time.perf_counter(), {}, {}
    probe_at = dict(zip((max(1, cfg.steps // 10), max(1, cfg.steps // 2), cfg.steps), PHASES)) \
        if objective in TWO_PATH else {}
    probe_seconds = 0.0
    for step in range(cfg.steps):
        if pos + cfg.batch > len(perm):
            perm, pos = order.permutation(len(images)), 0
        idx = perm[pos:pos + cfg.batch]
        pos += cfg.batch
        torch.manual_seed(seed * 100_003 + step)  # same augmentation draws for every objective
        batch = torch.stack([transform(images[i]) for i in idx])
        last = trainer.train_step(batch, raw[idx], cap[idx]).host_metrics()
        if step + 1 in probe_at:
            p0 = time.perf_counter()
            gates[probe_at[step + 1]] = probe_gates(model, trainer, images, raw, cap, truth)
            probe_seconds += time.perf_counter() - p0
    train_seconds = time.perf_counter() - t0 - probe_seconds
    zs = evaluate_world_zeroshot(model, n=cfg.eval_samples, seed=1)
    top1 = {t: zs[t]["top1"] for t in TASKS}
    top1["average"] = float(np.mean([top1[t] for t in TASKS]))
    return {"objective": objective, "seed": seed, "zeroshot": top1, "gates": gates,
            "final": last, "train_seconds": round(train_seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- summary

def _mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    # + 0.0 turns a -0.0 mean (equal runs) into 0.0 for printing.
    return float(v.mean()) + 0.0, float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _top1(run: dict, column: str) -> float:
    zs = run["zeroshot"]
    return zs[column] if column in zs or column != "average" else float(np.mean([zs[t] for t in TASKS]))


def summarise(results: dict[str, dict[int, dict]]) -> dict:
    """{objective: {task: (mean, std)}} in points, and the paired differences ALIP - X per task:
    {X: {task: (mean, std, wins, seeds)}} (wins = seeds where ALIP is strictly ahead)."""
    seeds = sorted(next(iter(results.values())))
    points = {o: {t: [100 * _top1(r[s], t) for s in seeds] for t in COLUMNS} for o, r in results.items()}
    table = {o: {t: _mean_std(v) for t, v in p.items()} for o, p in points.items()}
    paired = {}
    if "alip" in points:
        for other in points:
            if other == "alip":
                continue
            paired[other] = {}
            for t in COLUMNS:
                d = np.array(points["alip"][t]) - np.array(points[other][t])
                paired[other][t] = (*_mean_std(d), int((d > 0).sum()), len(seeds))
    return {"seeds": seeds, "table": table, "paired": paired}


def format_summary(summary: dict, cfg: BenchConfig) -> str:
    seeds, table, paired = summary["seeds"], summary["table"], summary["paired"]
    lines = [f"zero-shot top-1 (%), mean +- std over seeds {seeds}; {cfg.model}, {cfg.steps} steps x batch "
             f"{cfg.batch}, {cfg.n} samples, noise {cfg.noise:.0%}",
             f"{'objective':<12}" + "".join(f"{t:>16}" for t in COLUMNS)]
    lines.append(f"{'(chance)':<12}" + "".join(f"{CHANCE[t]:>16.1f}" for t in COLUMNS))
    for o, row in table.items():
        lines.append(f"{o:<12}" + "".join(f"{f'{m:.1f} +- {s:.1f}':>16}" for m, s in row.values()))
    if paired:
        lines.append("\npaired difference ALIP - X (points, mean +- std over seeds; ALIP ahead on k/n seeds)")
        for other, row in paired.items():
            lines.append(f"ALIP - {other:<12}" + "".join(
                f"{f'{m:+.1f} +- {s:.1f} ({w}/{n})':>22}" for m, s, w, n in row.values()))
    return "\n".join(lines)


def format_markdown(summary: dict, cfg: BenchConfig) -> str:
    """The docs/benchmarks.md table: one row per objective, then the paired differences."""
    seeds, table, paired = summary["seeds"], summary["table"], summary["paired"]
    head = "| objective | " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * len(COLUMNS)
    rows = ["| chance | " + " | ".join(f"{CHANCE[t]:.1f}" for t in COLUMNS) + " |"]
    rows += [f"| {o} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in row.values()) + " |"
             for o, row in table.items()]
    rows += [f"| ALIP − {other} | " + " | ".join(f"{m:+.1f} ± {s:.1f} ({w}/{n})" for m, s, w, n in row.values())
             + " |" for other, row in paired.items()]
    caption = (f"Zero-shot top-1 (%) on the built-in world ({world_words(cfg)}), mean ± std over seeds "
               f"{', '.join(map(str, seeds))} ({cfg.model}, {cfg.steps} steps × batch {cfg.batch}, {cfg.n} samples). "
               f"ALIP − X: paired difference per seed (ALIP ahead on k/n seeds).")
    return caption + "\n\n" + head + "\n" + "\n".join(rows)


def world_words(cfg: BenchConfig) -> str:
    return (f"preset {cfg.preset}: {cfg.noise:.0%} unrelated raw texts, raw-text specificity {cfg.specificity:g}, "
            f"captioner {cfg.captioner}")


GATE_ROWS = (("share_caption_over_raw", None, "share of W_c > W_t"),
             ("lcg_unrelated", "precision", "W_s < 1 flags an unrelated raw text: precision"),
             ("lcg_unrelated", "recall", "W_s < 1 flags an unrelated raw text: recall"),
             ("dcg_wrong_caption", "precision", "W_t > W_c flags a wrong caption: precision"),
             ("dcg_wrong_caption", "recall", "W_t > W_c flags a wrong caption: recall"),
             ("dcg_raw_adds", "precision", "W_t > W_c flags a raw text right where the caption is not: precision"),
             ("dcg_raw_adds", "recall", "W_t > W_c flags a raw text right where the caption is not: recall"))


def gate_table(results: dict[str, dict[int, dict]], objective: str = "alip") -> dict[str, dict[str, tuple]]:
    """{row label: {phase: (mean, std) over seeds, in %}} of the gate-accuracy probes of ``objective``."""
    runs = [r for r in results.get(objective, {}).values() if r.get("gates")]
    table: dict[str, dict[str, tuple]] = {}
    for key, field, label in GATE_ROWS:
        table[label] = {}
        for phase in PHASES:
            values = [100 * (r["gates"][phase][key] if field is None else r["gates"][phase][key][field])
                      for r in runs if phase in r["gates"]]
            values = [v for v in values if v == v]  # a metric with no positives/flags is nan: left out
            table[label][phase] = _mean_std(values) if values else (float("nan"), 0.0)
    return table


def format_gate_table(table: dict, results: dict, markdown: bool = False, objective: str = "alip") -> str:
    if not table:
        return ""
    steps = sorted({r["gates"][p]["step"] for r in results.get(objective, {}).values() for p in r.get("gates", {})})
    head = f"gate accuracy of {objective} (%, mean +- std over seeds) on its first {PROBE} training samples, " \
           f"momentum means frozen, at steps {steps}"
    if markdown:
        lines = ["| gate (%) | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * len(PHASES)]
        lines += [f"| {label} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in row.values()) + " |"
                  for label, row in table.items()]
        return head.replace("+-", "±") + "\n\n" + "\n".join(lines)
    lines = [head, f"{'':<72}" + "".join(f"{p:>14}" for p in PHASES)]
    lines += [f"{label:<72}" + "".join(f"{f'{m:.1f} +- {s:.1f}':>14}" for m, s in row.values())
              for label, row in table.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def _parse_objectives(text: str) -> list[str]:
    objectives = [o.strip() for o in text.split(",") if o.strip()]
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise SystemExit(f"unknown objective(s) {unknown}; choose from {', '.join(OBJECTIVES)}")
    if len(set(objectives)) != len(objectives):
        raise SystemExit(f"objective listed twice: {text}")
    return objectives


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"comma-separated: {', '.join(OBJECTIVES)}")
    ap.add_argument("--n", type=int, default=d.n, help="training samples per seed")
    ap.add_argument("--preset", default=d.preset, help="world preset (alip.data.world_presets): default, web-like; "
                    "sets --noise, --specificity and --captioner unless they are given")
    ap.add_argument("--noise", type=float, default=None, help="fraction of unrelated raw texts")
    ap.add_argument("--specificity", type=float, default=None, help="raw-text specificity in [0, 1]")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--eval-samples", type=int, default=d.eval_samples, help="held-out images per task")
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads per run")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (processes); 1 = in this process")
    ap.add_argument("--captioner", default=None, help="captioner spec (alip.captioners.load_captioner)")
    ap.add_argument("--json", default=None, help="also write every run and the summary here")
    ap.add_argument("--markdown", default=None, help="also write the docs/benchmarks.md table here")
    args = ap.parse_args(argv)
    objectives = _parse_objectives(args.objectives)
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"seed listed twice: {args.seeds}")
    if args.workers < 1 or args.threads < 1 or args.steps < 1 or args.batch < 2 or args.n < args.batch:
        raise SystemExit("need --workers >= 1, --threads >= 1, --steps >= 1, --batch >= 2 and --n >= --batch")
    from alip.data.world_presets import get_preset

    try:
        preset = get_preset(args.preset)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    cfg = BenchConfig(n=args.n, noise=preset.noise if args.noise is None else args.noise,
                      specificity=preset.raw_text_specificity if args.specificity is None else args.specificity,
                      steps=args.steps, batch=args.batch, lr=args.lr, model=args.model,
                      eval_samples=args.eval_samples, threads=args.threads,
                      captioner=args.captioner or preset.captioner(), preset=args.preset)
    # Two-path objectives (ALIP and its ablations embed raw text AND caption) cost ~1.4x a one-path run:
    # start them first so that the last runs, when a core may idle, are the short ones.
    runs = sorted(((o, s) for s in args.seeds for o in objectives), key=lambda r: r[0] not in TWO_PATH)
    print(f"{len(runs)} runs ({len(objectives)} objectives x seeds {args.seeds}), {args.workers} at a time, "
          f"{cfg.threads} thread(s) each", flush=True)
    t_start = time.perf_counter()
    results: dict[str, dict[int, dict]] = {o: {} for o in objectives}
    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        data = {s: str(build_data(cfg, s, Path(tmp), threads=cfg.threads * args.workers)) for s in args.seeds}
        t_train = time.perf_counter()
        done_seconds: list[float] = []

        def record(r: dict) -> None:
            results[r["objective"]][r["seed"]] = r
            done_seconds.append(r["seconds"])
            left = len(runs) - len(done_seconds)
            eta = np.mean(done_seconds) * left / min(args.workers, max(left, 1))
            zs = " ".join(f"{t} {100 * r['zeroshot'][t]:5.1f}" for t in COLUMNS)
            if r.get("gates"):
                g = r["gates"]
                zs += "  W_c>W_t " + "/".join(f"{100 * g[p]['share_caption_over_raw']:.0f}%" for p in PHASES if p in g)
            print(f"[{len(done_seconds)}/{len(runs)}] {r['objective']:<12} seed {r['seed']}: {zs}  "
                  f"loss {r['final']['loss']:.3f}  {r['seconds']:.0f}s  "
                  f"(elapsed {(time.perf_counter() - t_start) / 60:.1f} min, ETA {eta / 60:.1f} min)", flush=True)

        if args.workers == 1:
            for o, s in runs:
                record(train_one(o, s, data[s], cfg))
        else:
            # spawn: a fresh interpreter per worker (no forked torch thread pools).
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
                futures = [pool.submit(train_one, o, s, data[s], cfg) for o, s in runs]
                for f in as_completed(futures):
                    record(f.result())
    # Fixed order (objective list, seed list) whatever order the runs finished in.
    results = {o: {s: results[o][s] for s in args.seeds} for o in objectives}
    summary = summarise(results)
    print(f"\ntraining {(time.perf_counter() - t_train) / 60:.1f} min, total {(time.perf_counter() - t_start) / 60:.1f} min\n")
    print(format_summary(summary, cfg))
    gates = gate_table(results)
    if gates:
        print("\n" + format_gate_table(gates, results))
    markdown = format_markdown(summary, cfg)
    if gates:
        markdown += "\n\n" + format_gate_table(gates, results, markdown=True)
    print("\nmarkdown for docs/benchmarks.md:\n\n" + markdown, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "seeds": args.seeds, "objectives": objectives,
                       "results": {o: {str(s): r for s, r in rs.items()} for o, rs in results.items()},
                       "summary": {"table": summary["table"], "paired": summary["paired"], "gates": gates}},
                      f, indent=2)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
