"""The whole ALIP pipeline on the built-in world, offline, on local Ray (what `make demo` runs):

    generate the world -> caption it with the built-in captioner (Ray Data job)
    -> pretrain ALIP and, identically, a CLIP baseline (Ray Train, 2 workers, tiny preset)
    -> zero-shot accuracy of both side by side, with where the plots and exported models are.

    .venv/bin/python -m alip.demo                  # defaults: 6000 samples, 50% unrelated raw texts
    .venv/bin/python -m alip.demo --n 20000 --epochs 8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="alip demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="working folder (default demo_out/)")
    p.add_argument("--n", type=int, default=6000, help="world samples (default 6000)")
    p.add_argument("--noise", type=float, default=0.5, help="fraction of unrelated raw texts (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the tiny preset's)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--objectives", default="alip,clip", help="comma-separated (alip, clip, caption, ...)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    world_dir, captioned_dir, runs_dir = out / "world", out / "world-captioned", out / "runs"

    # 1. The built-in world (regenerated only when its parameters change).
    from alip.data.world import generate_world

    wanted = {"n": args.n, "noise": args.noise, "seed": args.seed}
    manifest = world_dir / "_world.json"
    have = json.loads(manifest.read_text()) if manifest.exists() else {}
    if {k: have.get(k) for k in wanted} != wanted:
        print(f"\n=== 1/4 generating the built-in world: {args.n} samples, {args.noise:.0%} unrelated raw texts ===")
        shutil.rmtree(captioned_dir, ignore_errors=True)
        generate_world(str(world_dir), args.n, noise=args.noise, seed=args.seed, shard_size=1000, overwrite=True)
    else:
        print(f"\n=== 1/4 built-in world already at {world_dir} ({args.n} samples) ===")

    # 2. Captions from the built-in captioner, through the Ray Data job (resumes if already done).
    import ray

    if not ray.is_initialized():
        from alip.ray_setup import init_local_ray

        # Private, never whatever `ray start` or a crashed session left on this machine.
        init_local_ray()
    from alip.captioning import CaptionJobConfig, run_captioning

    print("\n=== 2/4 captioning with the built-in captioner (Ray Data) ===")
    caption_summary = run_captioning(CaptionJobConfig(input=str(world_dir), output=str(captioned_dir),
                                                      captioner="builtin"))

    # 3. ALIP and the CLIP baseline, identical settings.
    from alip.pretrain.config import config_from_args
    from alip.pretrain.job import finish_run, format_zeroshot_table, run_training

    shutil.rmtree(runs_dir, ignore_errors=True)  # a demo starts its training runs fresh
    summaries = {}
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for i, objective in enumerate(objectives):
        print(f"\n=== 3/4 pretraining {objective.upper()} ({i + 1}/{len(objectives)}, Ray Train, "
              f"{args.num_workers} workers) ===")
        flags = ["--config", "tiny", "--data", str(captioned_dir), "--storage-path", str(runs_dir),
                 "--run-name", f"demo-{objective}", "--objective", objective, "--num-workers", str(args.num_workers),
                 "--seed", str(args.seed)]
        if args.epochs:
            flags += ["--epochs", str(args.epochs)]
        cfg = config_from_args(flags)
        result, summary = run_training(cfg)
        summaries[objective] = finish_run(cfg, result.checkpoint, summary)

    # 4. Side by side.
    print("\n=== 4/4 zero-shot top-1 (%) on the built-in world's held-out splits ===")
    print(format_zeroshot_table({o: {t: v["top1"] for t, v in s["zeroshot"].items()} for o, s in summaries.items()}))
    print(f"\ncaptioning: {caption_summary['output_rows']} captioned, {caption_summary['rejected_rows']} rejected, "
          f"captioner {caption_summary['captioner']}")
    for o, s in summaries.items():
        print(f"{o}: {s['final_step']} steps in {s['seconds']}s | plot {s.get('plot')} | export {s.get('export')}")
    print(f"total {time.perf_counter() - t_start:.0f}s. Serve the ALIP model with:\n"
          f"  .venv/bin/alip serve --model {summaries.get('alip', next(iter(summaries.values()))).get('export')}")
    report = {"caption": caption_summary, "runs": summaries}
    (out / "demo_summary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
