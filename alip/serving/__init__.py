"""The HTTP service around an exported ALIP / open_clip model (all of it Ray-free but deployment.py).

    config.py      ServeConfig: limits, batching, cache, auth (typed, validated)
    inputs.py      client input -> model input; every mistake a ClientError with its 4xx status
    middleware.py  ASGI body-size limit (declared and chunked) and bearer-token auth
    cache.py       async LRU of class text features keyed by (labels, templates); the last waiter
                   to go away cancels the computation
    classes.py     zero-shot class features in bounded, cancellable batches of prompts
    openai_compat.py  OpenAI-compatible POST /v1/embeddings (texts and data: URL images)
    encoder.py     Encoder (model + preprocessing) and LocalBackend (no cross-request batching)
    schemas.py     pydantic request/response models = the OpenAPI schema
    api.py         create_app(backend, config, page_html): the FastAPI routes
    explore.py     the /explore page's routes (scores files of `alip explore`)
    deployment.py  the Ray Serve deployment around `create_app`, whose backend batches across
                   requests; start/stop/run_local (`alip serve`) and app_builder
    static/        the pages: index.html (/) and explore.html (/explore)

serve/app.py (the app layer) only re-exports deployment.py under the import path that
serve/config.yaml names for the Serve CLI; nothing in this package imports it.
"""
from alip.serving.config import TOKEN_ENV, ServeConfig, ServeConfigError
from alip.serving.inputs import ClientError

__all__ = ["TOKEN_ENV", "ServeConfig", "ServeConfigError", "ClientError", "create_app", "build_local_app", "run_local"]


def __getattr__(name):  # keep `import alip.serving` light: FastAPI/torch load on first use
    if name in ("create_app", "build_local_app"):
        from alip.serving import api
        return getattr(api, name)
    raise AttributeError(name)


def run_local(model: str, host: str = "127.0.0.1", port: int = 8000, settings: dict | None = None,
              num_replicas: int | None = None, num_cpus: float | None = None) -> None:
    """`alip serve --model ...`: start a private local Ray + Serve with the deployment of
    :mod:`alip.serving.deployment`; blocks until Ctrl-C. `settings` are ServeConfig fields;
    `num_replicas=None` means autoscaling (1-4); `num_cpus` is CPUs PER REPLICA (default 1; Ray itself
    gets every CPU of the machine)."""
    ServeConfig.from_dict(settings)  # a typo in a setting fails here, before Ray (or Ray Serve) is imported
    from alip.serving.deployment import run_local as _run

    _run(model, host=host, port=port, settings=settings, num_replicas=num_replicas, num_cpus=num_cpus)
