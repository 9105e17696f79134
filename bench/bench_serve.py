"""Serving throughput and latency: cross-request batching vs none, side by side in one run.

    .venv/bin/python bench/bench_serve.py                      # ViT-B-32 (random weights), the issue's setting
    .venv/bin/python bench/bench_serve.py --model alip-tiny --requests 10   # quick run

One exported model served twice side by side (one 1-CPU replica each, as deployed); 32 concurrent
HTTP clients on 127.0.0.1 send single-image POST /v1/embeddings/image requests back to back, to
each variant in turn (alternating rounds, so outside load hits both alike):
  batched    @serve.batch max_batch_size=16 (the default deployment)
  unbatched  the same deployment with max_batch_size=1
plus the model alone, in this process with the replica's thread count: forward throughput at batch
16 vs batch 1 (the ceiling of what batching can buy on this hardware).
Targets (issue 6): batched >= 1.5x unbatched throughput, and a lower p99.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `serve` is a folder of the checkout

from alip.model import create_model, export_open_clip  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


async def _round(url: str, images: list[str], clients: int, per_client: int, record: bool) -> dict:
    """`clients` concurrent clients sending `per_client` single-image requests each."""
    latencies: list[float] = []
    errors = 0

    async def client(cid: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in range(per_client):
            body = {"images": [images[(cid + i) % len(images)]]}
            t0 = time.perf_counter()
            r = await http.post("/v1/embeddings/image", json=body)
            if r.status_code != 200:
                errors += 1
            latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
        batching = (await http.get("/v1/models")).json()["batching"]["image"]
    return {"latencies": latencies if record else [], "wall_s": wall if record else 0.0, "errors": errors,
            "batching": batching}


def _summary(rounds: list[dict], start: dict) -> dict:
    lat = sorted(x for r in rounds for x in r["latencies"])
    wall = sum(r["wall_s"] for r in rounds)
    end = rounds[-1]["batching"]
    batches, items = end["batches"] - start["batches"], end["items"] - start["items"]
    return {
        "requests": len(lat), "errors": sum(r["errors"] for r in rounds), "wall_s": wall,
        "throughput_rps": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
        "mean_batch": items / max(batches, 1), "largest_batch": end["largest"],
    }


@torch.inference_mode()
def _model_only(model, threads: int, seconds: float) -> dict:
    """Images/s of the bare image encoder at batch 1 and 16, interleaved rounds, best of each."""
    torch.set_num_threads(threads)
    model.eval()
    size = model.image_size
    x = {b: torch.randn(b, 3, size, size) for b in (1, 16)}
    for b in x:
        model.encode_image(x[b])  # warm-up
    rates: dict[int, list[float]] = {1: [], 16: []}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(len(v) for v in rates.values()) < 3:
        for b in (1, 16):
            reps = 16 // b
            t0 = time.perf_counter()
            for _ in range(reps):
                model.encode_image(x[b])
            rates[b].append(16 / (time.perf_counter() - t0))
    return {"b1_img_s": max(rates[1]), "b16_img_s": max(rates[16]), "ratio": max(rates[16]) / max(rates[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip/ALIP config name (random weights)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant")
    ap.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched deployment")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the private local Ray (one per variant replica)")
    ap.add_argument("--image-size", type=int, default=256, help="side of the JPEGs the clients send")
    ap.add_argument("--model-seconds", type=float, default=10.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "serve.json"))
    args = ap.parse_args()

    import ray
    from ray import serve

    from alip.ray_setup import init_local_ray
    from serve import app as serve_app

    torch.manual_seed(0)
    model = create_model(args.model)
    images = _images(16, args.image_size)
    variants = {"batched": args.batch, "unbatched": 1}
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    start: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export = str(export_open_clip(model, Path(tmp) / "export"))
        port = _free_port()
        env = serve_app._worker_env()
        # address="local": a private Ray, even when /tmp/ray/ray_current_cluster is left from a
        # crashed session or another `ray start` cluster runs on this machine
        init_local_ray(args.num_cpus, runtime_env={"env_vars": env}, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            # Both variants live side by side (same export, one 1-CPU replica each) and take turns,
            # so load from anything else on the machine hits both alike.
            t0 = time.perf_counter()
            for name, bs in variants.items():
                settings = {"max_batch_size": bs, "batch_wait_timeout_s": 0.01}
                serve.run(serve_app.build(export, settings, num_replicas=1, env=env), name=f"alip-{name}",
                          route_prefix=f"/{name}", blocking=False)
            print(f"replicas ready in {time.perf_counter() - t0:.0f}s; {args.rounds} rounds x "
                  f"{args.clients} clients x {args.requests} requests per variant", flush=True)
            base = f"http://127.0.0.1:{port}"
            for name in variants:  # warm-up: one request per client, not recorded
                start[name] = asyncio.run(_round(f"{base}/{name}", images, args.clients, 1, False))["batching"]
            for r in range(args.rounds):
                for name in (variants if r % 2 == 0 else reversed(list(variants))):
                    res = asyncio.run(_round(f"{base}/{name}", images, args.clients, args.requests, True))
                    rounds[name].append(res)
                    print(f"  round {r + 1} {name:9s} {len(res['latencies']) / res['wall_s']:6.2f} req/s, "
                          f"{res['errors']} errors", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    results: dict[str, dict] = {name: _summary(rounds[name], start[name]) for name in variants}
    # the replica has num_cpus=1, so Ray gives it one torch thread; measure the model the same way
    results["model_only"] = _model_only(model, threads=1, seconds=args.model_seconds)

    b, u, m = results["batched"], results["unbatched"], results["model_only"]
    rows = [
        ("throughput (req/s)", f"{b['throughput_rps']:.1f}", f"{u['throughput_rps']:.1f}",
         f"{b['throughput_rps'] / u['throughput_rps']:.2f}x"),
        ("p50 latency (ms)", f"{b['p50_ms']:.0f}", f"{u['p50_ms']:.0f}", f"{b['p50_ms'] / u['p50_ms']:.2f}x"),
        ("p99 latency (ms)", f"{b['p99_ms']:.0f}", f"{u['p99_ms']:.0f}", f"{b['p99_ms'] / u['p99_ms']:.2f}x"),
        ("mean / largest batch", f"{b['mean_batch']:.1f} / {b['largest_batch']}",
         f"{u['mean_batch']:.1f} / {u['largest_batch']}", ""),
        ("errors", str(b["errors"]), str(u["errors"]), ""),
        ("model only (img/s)", f"{m['b16_img_s']:.1f} @16", f"{m['b1_img_s']:.1f} @1", f"{m['ratio']:.2f}x"),
    ]
    n = args.clients * args.requests * args.rounds
    print(f"\n{args.model}, 1 replica (1 CPU) per variant, {args.clients} concurrent clients, "
          f"{n} single-image requests per variant; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':22}{'batched (' + str(args.batch) + ')':>16}{'unbatched (1)':>16}{'ratio':>10}")
    for name, bv, uv, r in rows:
        print(f"{name:22}{bv:>16}{uv:>16}{r:>10}")
    verdict_t = b["throughput_rps"] >= 1.5 * u["throughput_rps"]
    verdict_p = b["p99_ms"] < u["p99_ms"]
    print(f"target batched >= 1.5x unbatched throughput: {'met' if verdict_t else 'NOT met'}; "
          f"lower p99: {'met' if verdict_p else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "clients": args.clients, "requests": args.requests,
                               "rounds": args.rounds, "batch": args.batch, **results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
