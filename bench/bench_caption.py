"""Caption-job throughput: how busy the caption actors are, and the job vs a bare Python loop.

    .venv/bin/python bench/bench_caption.py --n 2000 --rounds 2   # the figures in the closing notes
    .venv/bin/python bench/bench_caption.py --n 96 --rounds 1 --json out.json   # tiny (the test)

Measured 2026-11-29, alone on the 2-core CPU box (`--n 2000 --rounds 2`): images/s bare 107.1 / 102.2,
serial actor 73.4 / 72.7, job 54.9 / 74.4; generate share before 93%, after 99%; job start-up 12.3 s;
steady-state job / bare 0.86, 1.09 (median 0.97, target >= 0.9); identical captions in all variants.

Three variants caption the same world shards with the same model and settings:

* **bare**: a plain Python loop in this process: read, decode, caption in batches of
  --batch-size, write Parquet with the caption column.
* **serial actor (before)**: the caption job's old actor design, rebuilt with plain Ray
  actors: decode tasks ship full-resolution RGB; one actor call per unit converts pixels,
  runs the processor, generates, encodes and writes the unit, serially.
* **job (after)**: alip.captioning.run_captioning: prepare tasks (decode + resize + processor),
  actors that only generate (calls queued ahead), commits in separate tasks.

Reported: the fraction of caption-actor wall time spent in ``generate`` (before vs after),
the job's fixed start-up seconds (until its first captions come back: actor start, model load,
first prepare) and its steady-state images/s against the bare loop's (after its model load);
target steady state >= 0.9x. ray.init is a one-time cluster cost, reported, not counted.
The machine is shared, so variants run in --rounds rounds, order rotating. Uses the shipped
builtin captioner, or a tiny random BLIP of similar size if it is not built yet.
"""
from __future__ import annotations

import argparse
import json
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
from alip.ray_setup import init_local_ray  # noqa: E402


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


def bare_loop(inp: str, out: str, spec: str, batch_size: int, threads: int) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    captioner = load_captioner(spec, batch_size=batch_size)
    load_s = time.perf_counter() - t0
    rows = 0
    for shard in list_shards(inp):
        kept, images, _rejects = decode_table(read_shard(shard))
        captions = captioner.caption(images)
        kept = kept.append_column("caption", pa.array(captions, pa.string()))
        kept = kept.append_column("captioner", pa.array([captioner.name] * kept.num_rows, pa.string()))
        write_shard(kept, f"{out}/{os.path.basename(shard)}", require_caption=True)
        rows += kept.num_rows
    total = time.perf_counter() - t0
    return {"seconds": total, "startup_s": load_s, "steady_s": total - load_s, "rows": rows}


# ----------------------------------------------------------------------------- "before": serial actor

def _decode_full_rgb(shard: str):
    """The old decode task: every image as full-resolution RGB bytes (what travelled to the actor)."""
    kept, images, _ = decode_table(read_shard(shard))
    return kept, [(im.tobytes(), im.size) for im in images]


class SerialCaptionActor:
    """The old actor: per unit, pixels -> PIL -> processor -> generate -> encode -> write, serially."""

    def __init__(self, spec: str, batch_size: int, threads: int):
        torch.set_num_threads(threads)
        self.captioner = load_captioner(spec, batch_size=batch_size)
        generate = self.captioner.model.generate
        self.generate_s = 0.0

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                self.generate_s += time.perf_counter() - t0

        self.captioner.model.generate = timed_generate
        self.started = time.perf_counter()

    def run_unit(self, decoded, out: str) -> int:
        kept, pixels = decoded
        images = [Image.frombytes("RGB", size, data) for data, size in pixels]
        captions = self.captioner.caption(images)
        kept = kept.append_column("caption", pa.array(captions, pa.string()))
        kept = kept.append_column("captioner", pa.array([self.captioner.name] * kept.num_rows, pa.string()))
        write_shard(kept, out, require_caption=True)
        return kept.num_rows

    def stats(self) -> dict:
        return {"generate_s": self.generate_s, "alive_s": time.perf_counter() - self.started}


def serial_actor_job(inp: str, out: str, spec: str, args) -> dict:
    import ray
    from ray.util import ActorPool

    t0 = time.perf_counter()
    actor_cls = ray.remote(SerialCaptionActor).options(num_cpus=1.0)
    actors = [actor_cls.remote(spec, args.batch_size or 32, args.threads)]
    decode = ray.remote(_decode_full_rgb).options(num_cpus=0.5)
    shards = list_shards(inp)
    pool = ActorPool(actors)
    done = list(pool.map_unordered(lambda a, s: a.run_unit.remote(decode.remote(s), f"{out}/{os.path.basename(s)}"),
                                   shards))
    stats = ray.get([a.stats.remote() for a in actors])
    for a in actors:
        ray.kill(a)
    return {"seconds": time.perf_counter() - t0, "rows": sum(done), "generate_fraction":
            sum(s["generate_s"] for s in stats) / max(sum(s["alive_s"] for s in stats), 1e-9)}


# ----------------------------------------------------------------------------- "after": the job

def job_config(inp: str, out: str, spec: str, args) -> CaptionJobConfig:
    """The caption job as `make demo` runs it (alip/demo.py: every default) unless flags say otherwise:
    the pool's size and threads then come from the job's local rule (CaptionJobConfig.sized)."""
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("rows_per_unit", args.rows_per_unit),
                                   ("max_actors", args.actors), ("cpus_per_actor", args.cpus_per_actor),
                                   ("torch_threads", args.job_threads)) if v is not None}
    return CaptionJobConfig(input=inp, output=out, captioner=spec, progress=False, **overrides)


def caption_job(inp: str, out: str, spec: str, args) -> dict:
    s = run_captioning(job_config(inp, out, spec, args), log=None)
    timing = s["timing"]
    startup = timing["first_caption_s"] or 0.0
    gen = timing["generate"]
    return {"seconds": s["pipeline_s"], "startup_s": startup, "steady_s": s["pipeline_s"] - startup,
            "steady_rows": s["rows_captioned"] - timing["first_caption_rows"], "rows": s["rows_captioned"],
            "captioner": s["captioner"],
            "generate_fraction": sum(a["generate_s"] for a in gen) / max(sum(a["alive_s"] for a in gen), 1e-9)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=250, help="world rows per shard (= one serial-actor unit)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the job's (32)")
    p.add_argument("--rows-per-unit", type=int, default=None, help="default: the job's (512: one unit per shard)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads of the bare loop and the serial actor (default: every core)")
    p.add_argument("--job-threads", type=int, default=None, help="the job's torch threads (default: its local rule)")
    p.add_argument("--actors", type=int, default=None, help="the job's max actors (default: its local rule)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="the job's CPUs per actor (default: its local rule)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all variants, order rotating")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.n < 1:
        p.error("--n and --rounds must be >= 1")

    import ray

    def say(line: str = "") -> None:
        print(line, flush=True)  # each figure as soon as it is measured (the full run takes minutes)

    tmp = tempfile.mkdtemp(prefix="bench-caption-")
    t0 = time.perf_counter()
    generate_world(f"{tmp}/world", args.n, shard_size=args.shard_size, log=None)
    spec = pick_captioner(tmp)
    torch.set_num_threads(args.threads)
    warm = load_captioner(spec)
    warm.caption([Image.new("RGB", (64, 64))])  # warm-up: lazy imports, first-call init
    say(f"world of {args.n} images generated in {time.perf_counter() - t0:.1f} s; captioner {warm.name}, "
        f"batch {args.batch_size or 32}, {os.cpu_count()} CPUs, bare-loop torch threads {args.threads}, "
        f"{args.rounds} round(s)")
    t0 = time.perf_counter()
    init_local_ray(num_cpus=os.cpu_count(), log_to_driver=False, log=lambda _m: None)
    init_s = time.perf_counter() - t0
    say(f"ray.init {init_s:.1f} s (one-time, not counted)")

    sized = job_config("in", "out", spec, args).sized(float(os.cpu_count()))
    say(f"the job (as `make demo` runs it unless flags say otherwise): {sized.max_actors} actor(s) x "
        f"{sized.threads} torch thread(s), {sized.cpus_per_actor:g} CPU each, batch {sized.batch_size}, units of "
        f"{sized.rows_per_unit} rows")
    variants = {"bare": lambda out: bare_loop(f"{tmp}/world", out, spec, args.batch_size or 32, args.threads),
                "serial": lambda out: serial_actor_job(f"{tmp}/world", out, spec, args),
                "job": lambda out: caption_job(f"{tmp}/world", out, spec, args)}
    labels = {"bare": "bare loop (read+decode+caption+write)", "serial": "serial actor (before)",
              "job": "caption job (after)"}
    names = list(variants)
    say(f"\n{'round':<7}{'variant':<40}{'seconds':>9}{'images/s':>10}{'generate %':>12}{'start-up s':>12}")
    per_round = []
    for r in range(args.rounds):
        got = {}
        # Rotate the order so a load change on the shared machine hits every variant alike.
        for variant in names[r % 3:] + names[:r % 3]:
            res = got[variant] = variants[variant](f"{tmp}/{variant}-{r}")
            frac = f"{100 * res['generate_fraction']:.0f}%" if "generate_fraction" in res else "-"
            start = f"{res['startup_s']:.1f}" if "startup_s" in res else "-"
            say(f"{r:<7}{labels[variant]:<40}{res['seconds']:>9.1f}{res['rows'] / res['seconds']:>10.1f}"
                f"{frac:>12}{start:>12}")
        job, bare = got["job"], got["bare"]
        if not job["rows"] == bare["rows"] == got["serial"]["rows"]:
            raise RuntimeError(f"variants captioned different row counts: { {v: g['rows'] for v, g in got.items()} }")
        pr = {
            "job_over_bare": bare["seconds"] / job["seconds"],
            "steady_job_over_bare": (job["steady_rows"] / job["steady_s"]) / (bare["rows"] / bare["steady_s"]),
            "job_startup_s": job["startup_s"], "bare_startup_s": bare["startup_s"],
            "generate_fraction_before": got["serial"]["generate_fraction"],
            "generate_fraction_after": job["generate_fraction"],
        }
        per_round.append(pr)
        say(f"{'':<7}round {r}: steady-state job / bare {pr['steady_job_over_bare']:.2f}, "
            f"whole run {pr['job_over_bare']:.2f}")
    ray.shutdown()

    def captions(out: str) -> dict:
        t = read_dataset(out, columns=["caption"])
        return dict(zip(t.column("key").to_pylist(), t.column("caption").to_pylist()))

    same = captions(f"{tmp}/bare-0") == captions(f"{tmp}/job-0") == captions(f"{tmp}/serial-0")
    n = got["job"]["rows"]
    med = {k: statistics.median(pr[k] for pr in per_round) for k in per_round[0]}
    say(f"\ngenerate share of caption-actor wall time: before {100 * med['generate_fraction_before']:.0f}%, "
        f"after {100 * med['generate_fraction_after']:.0f}% (median of rounds)")
    say(f"job start-up (until the first captions): {med['job_startup_s']:.1f} s "
        f"(bare loop's model load {med['bare_startup_s']:.1f} s)")
    steady = ", ".join(f"{pr['steady_job_over_bare']:.2f}" for pr in per_round)
    say(f"steady-state job / bare images/s: {steady}; "
        f"median {med['steady_job_over_bare']:.2f} (target >= 0.90); whole run incl. start-up "
        f"{med['job_over_bare']:.2f}")
    say(f"identical captions in all variants: {same}")
    report = {"n": n, "rounds": per_round, "median": med, "identical_captions": same, "ray_init_s": init_s}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
