"""`alip world|caption|pretrain|eval|explore|serve|demo`: one command, the same functions the Ray jobs use.

    alip world generate --out data/world --n 256 --noise 0.5 --seed 0
    alip caption --help          # captioning: Ray decode tasks + a caption actor pool (ray_jobs/caption.py)
    alip pretrain --help         # Ray Train pretraining (ray_jobs/pretrain.py)
    alip eval --help             # evaluation suites (ray_jobs/evaluate.py)
    alip explore --help          # per-sample gate scores for the /explore page (ray_jobs/explore.py)
    alip serve --model runs/alip-tiny/export
    alip cam --models A B --out grid.png   # Grad-CAM maps side by side + pointing game
    alip demo                    # the whole pipeline on the built-in world (what `make demo` runs)
    alip spot-watch              # on a cluster worker: EC2 spot notice -> drain this Ray node
"""
from __future__ import annotations

import argparse
import sys


def _world(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alip world", description="The built-in procedural image-text world.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write N samples as Parquet shards (local dir or s3://)")
    g.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    g.add_argument("--n", type=int, default=10_000, help="number of samples (default 10000)")
    g.add_argument("--preset", default="default",
                   help="default | web-like: sets --noise and --raw-text-specificity unless given, and names the "
                        "captioner to caption the world with (docs/benchmarks.md)")
    g.add_argument("--noise", type=float, default=None, help="fraction of raw texts unrelated to the image "
                   "(default: the preset's, 0.5)")
    g.add_argument("--raw-text-specificity", type=float, default=None,
                   help="0..1: how much related raw texts name (colour, shape, pattern); 0 = terse (default: the preset's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--shard-size", type=int, default=10_000)
    g.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args = p.parse_args(argv)
    from alip.data.world import generate_world, world_summary_json
    from alip.data.world_presets import get_preset

    try:
        preset = get_preset(args.preset)
        summary = generate_world(
            args.out, args.n, noise=preset.noise if args.noise is None else args.noise, seed=args.seed,
            shard_size=args.shard_size, overwrite=args.overwrite,
            raw_text_specificity=preset.raw_text_specificity if args.raw_text_specificity is None
            else args.raw_text_specificity)
    except ValueError as e:
        p.error(str(e))
    summary["preset"], summary["captioner"] = preset.name, preset.captioner()
    print(f"[world] preset {preset.name}: caption it with --captioner '{preset.captioner()}'")
    print(world_summary_json(summary))
    return 0


def _caption(argv: list[str]) -> int:
    from alip.captioning import main

    return main(argv)


def _pretrain(argv: list[str]) -> int:
    from alip.pretrain.job import main

    main(argv)
    return 0


def _eval(argv: list[str]) -> int:
    from alip.eval.runner import main

    return main(argv)


def _explore(argv: list[str]) -> int:
    from alip.explore.job import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alip serve", description="Serve an exported ALIP/open_clip model "
                                "over HTTP (Ray Serve + FastAPI) on a local Ray; Ctrl-C stops it.")
    p.add_argument("--model", required=True, help="export dir (local or s3://), or random:<config> for "
                   "randomly initialised weights (e.g. random:alip-tiny, a smoke test)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=None, help="fixed replica count (default: autoscale 1-4)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica")
    p.add_argument("--explore", action="append", default=[], metavar="PATH",
                   help="an `alip explore` scores file, or a folder of them (local or s3://), for the /explore "
                        "page; repeatable. Only these are ever read")
    p.add_argument("--cam-grid", default=None, metavar="PNG", help="a CAM grid PNG (`alip cam`) shown on /explore")
    args = p.parse_args(argv)
    from alip.serving import run_local

    settings = {k: v for k, v in (("explore_roots", args.explore), ("cam_grid", args.cam_grid)) if v}
    try:
        run_local(args.model, host=args.host, port=args.port, settings=settings or None,
                  num_replicas=args.replicas, num_cpus=args.num_cpus)
    except ValueError as e:
        p.error(str(e))
    return 0


def _cam(argv: list[str]) -> int:
    from alip.cam import main

    return main(argv)


def _demo(argv: list[str]) -> int:
    from alip.demo import main

    main(argv)
    return 0


def _spot_watch(argv: list[str]) -> int:
    from alip.spot_watch import main

    return main(argv)


COMMANDS = {"world": _world, "caption": _caption, "pretrain": _pretrain, "eval": _eval, "explore": _explore,
            "serve": _serve, "cam": _cam, "demo": _demo, "spot-watch": _spot_watch}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nalip: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
