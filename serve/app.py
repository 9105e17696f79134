"""The Ray Serve application of the ALIP HTTP API, where the Serve CLI finds it (the app layer).

    serve run serve/config.yaml                          (import_path: serve.app:app_builder)
    serve run serve.app:app_builder model=runs/tiny/export

Everything lives in the library, :mod:`alip.serving.deployment`: the deployment (ALIPServer), its
limits, the default model, `build`, `start`, `stop`, `run_local` (what `alip serve` runs). This
module only re-exports it under the import path serve/config.yaml names. The dependency goes one
way: serve/ imports alip, nothing under alip/ imports serve (tests/test_layering.py).
"""
from alip.serving.deployment import (  # the Serve CLI's import path; bench/bench_serve.py uses build, _worker_env
    APP_NAME,
    AUTOSCALING,
    BACKPRESSURE,
    MAX_ONGOING_REQUESTS,
    MAX_QUEUED_REQUESTS,
    MODEL_ENV,
    PAGE,
    REQUEST_TIMEOUT_S,
    ALIPServer,
    _worker_env,
    app_builder,
    build,
    run_local,
    start,
    stop,
)

__all__ = ["APP_NAME", "AUTOSCALING", "BACKPRESSURE", "MAX_ONGOING_REQUESTS", "MAX_QUEUED_REQUESTS", "MODEL_ENV",
           "PAGE", "REQUEST_TIMEOUT_S", "ALIPServer", "_worker_env", "app_builder", "build", "run_local", "start",
           "stop"]
