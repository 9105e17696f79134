"""Caption-job throughput: the whole Ray Data job vs a bare Python loop, same model, same run.

    .venv/bin/python bench/bench_caption.py                       # 2000 world images, builtin captioner
    .venv/bin/python bench/bench_caption.py --n 600 --actors 2 --threads 1

Both sides do the same work on the same Parquet shards: read, decode, caption in batches of
--batch-size, write Parquet with the caption column. The bare loop is plain Python in this
process (torch with --threads threads); the job is alip.captioning.run_captioning on a local
Ray started beforehand (ray.init is a one-time cluster cost, reported but not counted). The
job's time includes starting its actor process (imports + model load); the bare loop's
includes loading the model, after one untimed warm-up load in this process (lazy imports).
The machine is shared, so bare loop and job run in --rounds pairs, alternating which goes
first, and the per-pair ratios are reported. Both must produce identical captions (deterministic decoding). Target: job >= 0.8x.
Uses the shipped builtin captioner, or a tiny random BLIP of similar size if it is not built yet.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from alip.captioners import BUILTIN_MODEL_DIR, load_captioner  # noqa: E402
from alip.captioning import CaptionJobConfig, run_captioning  # noqa: E402
from alip.data.dataset import list_shards, read_dataset, read_shard, write_shard  # noqa: E402
from alip.data.images import decode_table  # noqa: E402
from alip.data.world import generate_world  # noqa: E402


def pick_captioner(tmp: str) -> str:
    if (BUILTIN_MODEL_DIR / "config.json").exists():
        return "builtin"
    from alip.captioners.tiny import build_word_tokenizer, tiny_blip
    from alip.data.world import COLOURS, POSITIONS, SHAPES, SIZES

    words = list(SHAPES) + list(COLOURS) + list(SIZES) + list(POSITIONS) + ["a", "on", "the", "at", "in", "background"]
    torch.manual_seed(0)
    model, processor = tiny_blip(build_word_tokenizer(words))  # builtin-sized: 64 px, 2+2 layers, width 128
    model.save_pretrained(f"{tmp}/tiny-blip")
    processor.save_pretrained(f"{tmp}/tiny-blip")
    return f"hf:{tmp}/tiny-blip"


def bare_loop(inp: str, out: str, spec: str, batch_size: int, threads: int) -> float:
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    captioner = load_captioner(spec, batch_size=batch_size)
    for shard in list_shards(inp):
        kept, images, _rejects = decode_table(read_shard(shard))
        captions = captioner.caption(images)
        kept = kept.append_column("caption", pa.array(captions, pa.string()))
        kept = kept.append_column("captioner", pa.array([captioner.name] * kept.num_rows, pa.string()))
        write_shard(kept, f"{out}/{os.path.basename(shard)}", require_caption=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-unit", type=int, default=250)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (bare loop and each actor)")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2, help="bare/job pairs, order alternating")
    args = p.parse_args(argv)

    import ray

    tmp = tempfile.mkdtemp(prefix="bench-caption-")
    generate_world(f"{tmp}/world", args.n, shard_size=args.shard_size, log=None)
    spec = pick_captioner(tmp)

    torch.set_num_threads(args.threads)
    load_captioner(spec).caption([Image.new("RGB", (64, 64))])  # warm-up: lazy imports, first-call init
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0

    def job(out: str) -> tuple[float, dict]:
        cfg = CaptionJobConfig(
            input=f"{tmp}/world", output=out, captioner=spec, batch_size=args.batch_size,
            rows_per_unit=args.rows_per_unit, min_actors=args.actors, max_actors=args.actors,
            cpus_per_actor=args.cpus_per_actor, torch_threads=args.threads, progress=False,
        )
        summary = run_captioning(cfg, log=None)
        return summary["pipeline_s"], summary

    rows = []  # (round, variant, seconds)
    for r in range(args.rounds):
        # Alternate the order so a load change on the shared machine hits both variants alike.
        order = ("bare", "job") if r % 2 == 0 else ("job", "bare")
        for variant in order:
            out = f"{tmp}/{variant}-{r}"
            if variant == "bare":
                rows.append((r, variant, bare_loop(f"{tmp}/world", out, spec, args.batch_size, args.threads)))
            else:
                seconds, summary = job(out)
                rows.append((r, variant, seconds))
    ray.shutdown()

    def captions(out: str) -> dict:
        t = read_dataset(out, columns=["caption"])
        return dict(zip(t.column("key").to_pylist(), t.column("caption").to_pylist()))

    same = captions(f"{tmp}/bare-0") == captions(f"{tmp}/job-0")
    n = summary["rows_captioned"]
    print(f"\ncaptioner {summary['captioner']}, {n} images, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads}, actors {args.actors}, "
          f"units of {args.rows_per_unit} rows")
    print(f"{'round':<7}{'variant':<34}{'seconds':>9}{'images/s':>10}")
    for r, variant, seconds in rows:
        name = "bare loop (read+decode+caption+write)" if variant == "bare" else "Ray Data job (whole pipeline)"
        print(f"{r:<7}{name:<34}{seconds:>9.1f}{n / seconds:>10.1f}")
    ratios = []
    for r in range(args.rounds):
        t = {v: s for rr, v, s in rows if rr == r}
        ratios.append(t["bare"] / t["job"])
    print(f"job / bare images/s per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f} (target >= 0.80)")
    print(f"(ray.init {init_s:.1f} s, one-time, not counted; identical captions: {same})")


if __name__ == "__main__":
    main()
