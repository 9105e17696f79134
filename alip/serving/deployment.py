"""The Ray Serve deployment of the ALIP HTTP API (alip.serving.api) with cross-request batching.

Run it
  * Python / `alip serve`:  alip.serving.deployment.run_local("runs/tiny/export", host="127.0.0.1", port=8000)
  * Serve CLI:              serve run serve/config.yaml        (or: serve deploy serve/config.yaml)
  * import path:            serve run serve.app:app_builder model=runs/tiny/export
(serve/app.py, the app layer, only re-exports this module for the Serve CLI's import path; the
library never imports it.)
The model: the `model` argument, else $ALIP_SERVE_MODEL, else the demo's export
(<demo folder>/runs/demo-alip/export, as `make demo` writes it: the demo folder is $ALIP_DEMO_OUT,
else demo_out; see alip.demo.demo_export); a relative path is looked up in the current directory,
then in this checkout. A missing model is a clear error, before any replica starts.

Holding under overload and abuse (Ray Serve 2.60 semantics, checked in its source):
  * `max_ongoing_requests` per replica; beyond that up to `max_queued_requests` wait in the
    proxy's router, and the next one gets an immediate 503 with `Retry-After` (backpressure_config)
    instead of growing latency and memory.
  * `http_options.request_timeout_s`: the proxy answers 408 and cancels the request.
  * Liveness: the proxy's own `GET /-/healthz` (never queues behind model work). Readiness:
    `check_health` runs a real 1-image + 1-text forward every `health_check_period_s`; a replica
    that fails it is replaced. `GET /healthz` (an app route) shows that probe's last result.
  * A cancelled request (client gone, timeout) stops a class-feature computation between batches.

What Ray adds to the Ray-free app: each image / text of every request goes into a `@serve.batch`
queue (images and texts separately), so 32 clients sending one image each share forwards of up to
`max_batch_size` images instead of running 32 forwards of one; replicas autoscale on ongoing
requests. `max_ongoing_requests` must be >= the batch size, or a replica never holds enough
requests to fill a batch.

One adjustment to @serve.batch: Ray forms the next batch eagerly, from whatever reached its queue
within `batch_wait_timeout_s` of the first item, even while the previous batch is still computing;
the formed batch then waits for the running one. With a model slower than the arrival gaps, batches
stay tiny (measured: mean 1.6 images per forward with 32 clients on ViT-B-32, CPU). So items wait
at a gate (`_ForwardGate`) while a forward of their kind runs, and enter Ray's queue together when
it ends: the next batch takes everything that arrived meanwhile, as Triton-style dynamic batchers
do. With the model idle the gate is open and a lone request pays only `batch_wait_timeout_s`.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve import Application

from alip.model import load_model
from alip.serving.api import create_app
from alip.serving.config import TOKEN_ENV, ServeConfig, ServeConfigError
from alip.serving.encoder import Encoder
from alip.serving.inputs import strict_pillow_bomb_check

log = logging.getLogger("ray.serve")

PAGE = Path(__file__).with_name("static") / "index.html"
MODEL_ENV = "ALIP_SERVE_MODEL"
#: the folder that holds the `alip` package: a checkout (pip install -e .) or site-packages
ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "alip"

#: replicas scale on ongoing requests per replica; a full batch per replica is the target
AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 16,
    "upscale_delay_s": 10,
    "downscale_delay_s": 120,
}
MAX_ONGOING_REQUESTS = 64
#: waiting in the proxy's router beyond the replicas' ongoing requests; then 503 at once
MAX_QUEUED_REQUESTS = 128
BACKPRESSURE = {"status_code": 503, "retry_after_s": 1}
REQUEST_TIMEOUT_S = 60.0


class _ForwardGate:
    """Open while no forward of one kind runs; items wait here instead of forming tiny batches."""

    def __init__(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()

    async def enter(self) -> None:
        await self._idle.wait()

    def busy(self) -> None:
        self._idle.clear()

    def free(self) -> None:
        self._idle.set()


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    max_queued_requests=MAX_QUEUED_REQUESTS,  # beyond this a client gets 503 at once, not a growing wait
    backpressure_config=BACKPRESSURE,
    autoscaling_config=AUTOSCALING,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
@serve.ingress()
class ALIPServer:
    """One replica: the model, two batch queues and the FastAPI app built around them."""

    def __init__(self, model: str, settings: dict[str, Any] | None = None):
        self.config = ServeConfig.from_dict(settings)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        strict_pillow_bomb_check()  # this process only serves: Pillow's bomb warning -> 413
        self.encoder = Encoder(load_model(model))
        self._probe = self.encoder.probe()  # a replica that cannot run a forward never becomes ready
        self._counts = {kind: {"batches": 0, "items": 0, "largest": 0} for kind in ("image", "text")}
        self._gates = {kind: _ForwardGate() for kind in ("image", "text")}
        for handler in (self._image_batch, self._text_batch):
            handler.set_max_batch_size(self.config.max_batch_size)
            handler.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        log.info("ALIP replica ready: model %s, batch %d", self.encoder.info()["id"], self.config.max_batch_size)

    def __serve_build_asgi_app__(self):
        return create_app(self, self.config, PAGE.read_text() if PAGE.is_file() else None)

    # ---- the Backend protocol (alip.serving.encoder.Backend), fed through the batch queues ----
    async def embed_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(await asyncio.gather(*(self._submit("image", self._image_batch, p) for p in pixels)))

    async def embed_texts(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(await asyncio.gather(*(self._submit("text", self._text_batch, t) for t in tokens)))

    async def _submit(self, kind: str, batch_fn, item: torch.Tensor) -> torch.Tensor:
        await self._gates[kind].enter()  # see the module docstring: keeps batches full under load
        return await batch_fn(item)

    async def encode_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        # one bounded batch of class prompts; the caller awaits between batches (cancellable)
        return await asyncio.to_thread(self.encoder.encode_texts, tokens)

    def last_probe(self) -> dict:
        return dict(self._probe)

    def stats(self) -> dict:
        """Per queue: forwards run, items carried, largest batch (shown in GET /v1/models)."""
        return {"max_batch_size": self.config.max_batch_size, **self._counts}

    def _count(self, kind: str, n: int) -> None:
        c = self._counts[kind]
        c["batches"] += 1
        c["items"] += n
        c["largest"] = max(c["largest"], n)

    # The decorator's sizes are placeholders; __init__ sets them from ServeConfig.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _image_batch(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        return await self._forward("image", self.encoder.encode_images, pixels)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _text_batch(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        return await self._forward("text", self.encoder.encode_texts, tokens)

    async def _forward(self, kind: str, encode, items: list[torch.Tensor]) -> list[torch.Tensor]:
        self._count(kind, len(items))
        gate = self._gates[kind]
        gate.busy()
        try:
            # in a thread: the event loop keeps reading and decoding requests meanwhile
            return list(await asyncio.to_thread(encode, torch.stack(items)))
        finally:
            gate.free()

    async def check_health(self) -> None:
        """Serve's readiness check (every health_check_period_s): a real tiny forward, in a thread so
        the event loop keeps serving; raising marks the replica unhealthy and Serve replaces it."""
        self._probe = await asyncio.to_thread(self.encoder.probe)


def build(model: str, settings: dict[str, Any] | None = None, *, num_replicas: int | None = None,
          max_ongoing_requests: int | None = None, max_queued_requests: int | None = None,
          num_cpus: float | None = None, env: dict[str, str] | None = None) -> Application:
    """The bound application. `num_replicas` fixes the replica count (autoscaling otherwise);
    `num_cpus` is per replica (default 1); `max_queued_requests` bounds the wait queue (503 beyond)."""
    cfg = ServeConfig.from_dict(settings)  # fail in the driver, not in a replica restart loop
    model = _model_ref(model)
    ongoing = max_ongoing_requests or max(MAX_ONGOING_REQUESTS, 2 * cfg.max_batch_size)
    if ongoing < cfg.max_batch_size:
        raise ServeConfigError(f"max_ongoing_requests={ongoing} < max_batch_size={cfg.max_batch_size}: "
                               "a replica would never hold enough requests to fill a batch")
    queued = MAX_QUEUED_REQUESTS if max_queued_requests is None else max_queued_requests
    if queued < 1:
        raise ServeConfigError(f"max_queued_requests must be >= 1 (got {queued}): an unbounded queue turns "
                               "overload into growing latency and memory instead of a fast 503")
    if num_cpus is not None and not num_cpus > 0:
        raise ServeConfigError(f"num_cpus (per replica) must be > 0, got {num_cpus}")
    options: dict[str, Any] = {"max_ongoing_requests": ongoing, "max_queued_requests": queued}
    if num_replicas is not None:
        options.update(num_replicas=num_replicas, autoscaling_config=None)
    else:
        options["autoscaling_config"] = {**AUTOSCALING, "target_ongoing_requests": cfg.max_batch_size}
    actor: dict[str, Any] = {"num_cpus": num_cpus or 1}
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    if num_cpus is not None or env:
        options["ray_actor_options"] = actor
    return ALIPServer.options(**options).bind(model, cfg.to_dict())


def app_builder(args: dict[str, Any]) -> Application:
    """`serve run serve.app:app_builder model=<dir or s3://...> [max_batch_size=16 ...]`, and the
    builder `serve run serve/config.yaml` calls. The model: `model`, else $ALIP_SERVE_MODEL, else
    the demo's export; other args are ServeConfig fields (plus num_replicas)."""
    from alip.demo import demo_export

    args = dict(args or {})
    model = args.pop("model", None) or os.environ.get(MODEL_ENV)
    if not model:
        wanted = demo_export()
        default = _resolve_relative(wanted)
        if not default.exists():
            where = str(default) if Path(wanted).is_absolute() else \
                " and ".join(dict.fromkeys(map(str, (Path.cwd(), ROOT))))
            raise ServeConfigError(
                f"no model given and the default, the demo's export {wanted}, does not exist (looked in {where}): "
                f"run `make demo` first, or set {MODEL_ENV}=<export dir or s3:// URI>, "
                "or pass it: serve run serve.app:app_builder model=<export dir>")
        model = str(default)
    num_replicas = args.pop("num_replicas", None)
    log.info("ALIP serve: model %s", model)
    return build(str(model), args, num_replicas=int(num_replicas) if num_replicas is not None else None)


def _resolve_relative(path: str) -> Path:
    """A relative path from the current directory if it exists there, else from this checkout
    (`serve run` may build the application in a process whose cwd is not the shell's)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return ROOT / p if (ROOT / p).exists() else p


def _model_ref(model: str) -> str:
    """Fail in the driver on a model that cannot load (not in a replica restart loop), and make a
    local path absolute: replicas do not run in the shell's working directory."""
    from alip.model import EXPORT_CONFIG, ModelLoadError, model_config

    if model.startswith("s3://"):
        return model
    path = _resolve_relative(model[len("local-dir:"):] if model.startswith("local-dir:") else model)
    if path.exists():
        if not (path / EXPORT_CONFIG).is_file():
            raise ModelLoadError(f"{path} has no {EXPORT_CONFIG}: not an ALIP/open_clip export directory")
        return str(path.resolve())
    if model.startswith("random:"):  # random weights, asked for explicitly (demos, benchmarks)
        model_config(model[len("random:"):])
        return model
    from alip.model import load_model

    load_model(model)  # a missing path: ModelLoadError naming it (and random:<name> for a config name)
    return model


def _worker_env() -> dict[str, str]:
    """Env the replicas need: `alip` importable (also when it runs from a checkout on PYTHONPATH rather
    than installed), the auth token and S3 settings passed on."""
    root = str(ROOT)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    for key in (TOKEN_ENV, "ALIP_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "ALIP_CACHE"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def start(model: str, host: str = "127.0.0.1", port: int = 8000, settings: dict[str, Any] | None = None,
          num_replicas: int | None = None, num_cpus: float | None = None, *,
          request_timeout_s: float = REQUEST_TIMEOUT_S, max_ongoing_requests: int | None = None,
          max_queued_requests: int | None = None, ray_num_cpus: int | None = None) -> str:
    """Start a private local Ray (unless this process already joined one) and Serve on host:port,
    deploy the app; returns the base URL. `num_cpus` is per replica; `ray_num_cpus` caps the local
    Ray (default: every CPU of the machine). Non-blocking: call `stop()` (or ray.shutdown()) when done."""
    import ray

    env = _worker_env()
    app = build(model, settings, num_replicas=num_replicas, num_cpus=num_cpus, env=env,
                max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests)
    if ray.is_initialized():
        print(f"[ray] serving on the Ray this process already joined ({ray.get_runtime_context().gcs_address})",
              flush=True)
    else:
        from alip.ray_setup import init_local_ray

        # address="local": always a new private Ray, never a stale /tmp/ray/ray_current_cluster
        # or someone else's `ray start` cluster (init_local_ray says so on the console)
        init_local_ray(ray_num_cpus, runtime_env={"env_vars": env})
    total = ray.cluster_resources().get("CPU", 0)
    if (num_cpus or 1) > total:
        raise ServeConfigError(f"num_cpus={num_cpus} per replica, but this Ray has only {total:g} CPUs: "
                               "the replica could never start")
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    serve.shutdown()


def run_local(model: str, host: str = "127.0.0.1", port: int = 8000, settings: dict[str, Any] | None = None,
              num_replicas: int | None = None, num_cpus: float | None = None) -> None:
    """Blocking entry point for `alip serve --model ...`: serve until Ctrl-C, then shut down.
    `num_cpus` is CPUs per replica (the Ray started here gets every CPU of the machine)."""
    import time

    import ray

    url = start(model, host, port, settings, num_replicas, num_cpus)
    print(f"ALIP service on {url}  (page: {url}/  API docs: {url}/docs  liveness: {url}/-/healthz)  "
          "Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        ray.shutdown()
