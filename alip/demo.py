"""The whole ALIP pipeline on the built-in world, offline, on local Ray (what `make demo` runs):

    generate the world -> caption it with the built-in captioner (Ray decode tasks + a caption actor pool)
    -> pretrain ALIP and, identically, a CLIP baseline (Ray Train, 2 workers, tiny preset)
    -> zero-shot accuracy of both side by side, with where the plots and exported models are
    -> where each model looks: a Grad-CAM grid and the pointing game (alip.cam).
    -> per-sample gate scores of the captioned world for the /explore page (alip.explore).

    .venv/bin/python -m alip.demo                  # defaults: 6000 samples, 50% unrelated raw texts
    .venv/bin/python -m alip.demo --n 20000 --epochs 8

The working folder is --out, else $ALIP_DEMO_OUT, else demo_out/ (in the current directory). The
default model of `serve run serve/config.yaml` is the ALIP export in that same folder
(alip.demo.demo_export), so setting ALIP_DEMO_OUT moves both (the tests point it at a scratch folder,
so that a user's `make demo` output never changes what they see).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

#: the demo's working folder when --out is not given (else DEFAULT_OUT)
OUT_ENV = "ALIP_DEMO_OUT"
DEFAULT_OUT = "demo_out"


def default_out() -> str:
    """$ALIP_DEMO_OUT, else demo_out (relative to the current directory)."""
    return os.environ.get(OUT_ENV) or DEFAULT_OUT


def _captioned_by(captioned_dir: Path) -> str | None:
    """The captioner id pinned in a caption job's output folder (None: no job wrote there yet)."""
    from alip.captioning.output import MANIFEST

    try:
        return json.loads((captioned_dir / MANIFEST).read_text()).get("captioner")
    except (OSError, ValueError):
        return None


def demo_export(objective: str = "alip", out: str | None = None) -> str:
    """Where the demo exports `objective`'s model: <out, default :func:`default_out`>/runs/demo-<objective>/export."""
    return os.path.join(out or default_out(), "runs", f"demo-{objective}", "export")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="alip demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=f"working folder (default ${OUT_ENV}, else {DEFAULT_OUT}/)")
    p.add_argument("--n", type=int, default=6000, help="world samples (default 6000)")
    p.add_argument("--preset", default="default", help="world preset (alip.data.world_presets): default | web-like "
                   "(generic, sometimes wrong captions; specific raw texts)")
    p.add_argument("--noise", type=float, default=None, help="fraction of unrelated raw texts (default: the preset's, 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the tiny preset's)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--objectives", default="alip,clip", help="comma-separated (alip, clip, caption, ...)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out or default_out()).resolve()
    world_dir, captioned_dir, runs_dir = out / "world", out / "world-captioned", out / "runs"

    # 1. The built-in world (regenerated only when its parameters change).
    from alip.data.world import generate_world
    from alip.data.world_presets import get_preset

    preset = get_preset(args.preset)
    noise = preset.noise if args.noise is None else args.noise
    wanted = {"n": args.n, "noise": noise, "raw_text_specificity": preset.raw_text_specificity, "seed": args.seed}
    manifest = world_dir / "_world.json"
    have = json.loads(manifest.read_text()) if manifest.exists() else {}
    have.setdefault("raw_text_specificity", 0.0)  # worlds written before the knob existed
    if {k: have.get(k) for k in wanted} != wanted:
        print(f"\n=== 1/4 generating the built-in world ({preset.name}): {args.n} samples, {noise:.0%} unrelated raw "
              f"texts, raw-text specificity {preset.raw_text_specificity:g} ===")
        shutil.rmtree(captioned_dir, ignore_errors=True)
        generate_world(str(world_dir), args.n, noise=noise, seed=args.seed, shard_size=1000, overwrite=True,
                       raw_text_specificity=preset.raw_text_specificity)
    else:
        print(f"\n=== 1/4 built-in world already at {world_dir} ({args.n} samples) ===")

    # 2. Captions from the built-in captioner, through the caption job (resumes if already done).
    import ray

    if not ray.is_initialized():
        from alip.ray_setup import init_local_ray

        # Private, never whatever `ray start` or a crashed session left on this machine.
        init_local_ray()
    from alip.captioners import captioner_id, parse_spec
    from alip.captioning import CaptionJobConfig, run_captioning

    captioner = preset.captioner("builtin")
    named = "the built-in captioner" if captioner == "builtin" else captioner
    print(f"\n=== 2/4 captioning with {named} (Ray: decode tasks + a caption actor pool) ===")
    if _captioned_by(captioned_dir) not in (None, captioner_id(parse_spec(captioner))):
        shutil.rmtree(captioned_dir)  # captioned by another preset's captioner: the job would refuse to mix them
    caption_summary = run_captioning(CaptionJobConfig(input=str(world_dir), output=str(captioned_dir),
                                                      captioner=captioner))

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
    cam_summary = cam_step(summaries, out, seed=args.seed)
    explore_summary = explore_step(summaries, captioned_dir, out)
    served = summaries.get('alip', next(iter(summaries.values())))
    serve_flags = (f" --explore {explore_summary['out']}" if explore_summary else "") + \
        (f" --cam-grid {cam_summary['grid']}" if cam_summary else "")
    print(f"total {time.perf_counter() - t_start:.0f}s. Serve the ALIP model with:\n"
          f"  .venv/bin/alip serve --model {served.get('export')}{serve_flags}")
    if cam_summary:
        print(cam_line(cam_summary))
    if explore_summary:
        print(explore_line(explore_summary))
    report = {"caption": caption_summary, "runs": summaries, "cam": cam_summary, "explore": explore_summary}
    (out / "demo_summary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def cam_step(summaries: dict, out: Path, seed: int = 0, pointing_game: int = 500) -> dict | None:
    """Where each model looks (alip.cam): Grad-CAM grid + pointing game on held-out world scenes,
    when both ALIP and CLIP were trained and exported; None otherwise."""
    if not ({"alip", "clip"} <= summaries.keys() and all(summaries[o].get("export") for o in ("alip", "clip"))):
        return None
    from alip.cam import CamConfig, run_cam

    print(f"\n=== class activation maps, ALIP vs CLIP (Grad-CAM; pointing game on {pointing_game} held-out "
          f"world scenes) ===")
    # The untrained model is the reference: on these flat scenes raw saliency alone finds objects.
    untrained = "random:" + str(summaries["alip"].get("model") or "alip-tiny")
    return run_cam(CamConfig(models=[str(summaries[o]["export"]) for o in ("alip", "clip")] + [untrained],
                             names=["ALIP", "CLIP", "untrained"], out=str(Path(out) / "cam" / "grid.png"),
                             n=8, pointing_game=pointing_game, seed=seed))


def explore_step(summaries: dict, captioned_dir: Path, out: Path) -> dict | None:
    """Per-sample gate scores of the captioned world with the ALIP model (alip.explore), for /explore."""
    export = summaries.get("alip", {}).get("export")
    if not export:
        return None
    from alip.explore.job import ExploreConfig, run_explore

    print("\n=== data explorer: which raw texts does ALIP distrust? (Ray Data, alip explore) ===")
    return run_explore(ExploreConfig(model=str(export), data=str(captioned_dir),
                                     out=str(Path(out) / "explore" / "scores.parquet")))


def explore_line(summary: dict) -> str:
    fig = summary.get("truth", {}).get(summary["caption_columns"][0])
    truth = (f" | unrelated raw texts among the 10% lowest W_s {fig['unrelated_lowest_w_s']:.1%} vs the 10% highest "
             f"{fig['unrelated_highest_w_s']:.1%}" if fig else "")
    return (f"explorer scores: {summary['out']}{truth}\n  explorer page: http://127.0.0.1:8000/explore "
            f"(after the `alip serve ... --explore` command above)")


def cam_line(cam_summary: dict) -> str:
    pg = cam_summary["pointing_game"]
    return (f"CAM grid: {cam_summary['grid']} | pointing game (n={pg['n']}): "
            + ", ".join(f"{k} {v['pct']:.1f}%" for k, v in pg["models"].items())
            + f", random point {pg['random_baseline_pct']:.1f}% | summary {cam_summary['summary_path']}")


if __name__ == "__main__":
    main()
