"""Starting or attaching Ray, saying which, without Ray's known-harmless console noise.

Two ways in, and every entry point says which one it took:

* :func:`init_local_ray` starts a PRIVATE local Ray for this process (``address="local"``). It
  never attaches to whatever else runs on the machine: a stale ``/tmp/ray/ray_current_cluster``
  left by a crashed session, or another user's ``ray start``, cannot hijack it.
* :func:`attach_ray` joins an existing cluster (an address, ``auto``, or ``$RAY_ADDRESS`` as set
  by ``ray job submit``) and prints what it found: address, nodes, CPUs, GPUs.

:func:`connect_ray` picks between them the way the jobs and the CLI want: an explicit address or
``$RAY_ADDRESS`` attaches, nothing starts a private local Ray.

Quieting (:func:`quiet_ray`): a first run used to print pages of Ray lines that look like
failures and are not. What is silenced, and why it is safe:

* Ray's own INFO chatter on the driver ("Started a local Ray instance", Ray Data's execution
  plans and its 10-second progress dumps when stdout is not a terminal): our jobs print their own
  progress lines. WARNING and above from Ray still show.
* Ray Train V2's placement-group cleaner thread dying with a traceback on a Ray without a dashboard
  (a private local Ray: its placement groups die with the driver anyway).
* Exact messages known to be harmless (:data:`HARMLESS_MESSAGES`), filtered on the named Ray
  loggers in the driver AND in every worker (a ``worker_process_setup_hook``), e.g. Ray Train V2's
  "Failed to query Ray Train Controller actor state" (its placement-group cleaner polls the State
  API, which is briefly unavailable while a run starts or ends; it keeps monitoring) and the
  PreemptionWatcher's poll failure (it polls the drain state of nodes; a failed poll is retried).
* The "Token authentication is enabled for this Ray cluster" notice of every new local Ray (token
  auth stays on: that is Ray 2.60's default for a cluster it starts; see docs/cluster.md on tokens).
* Lines of Ray's C++ core worker known to be harmless (:data:`HARMLESS_WORKER_LINES`), printed at
  ERROR level from inside a worker process, e.g. "Actor with class name: 'PreemptionWatcher' ... has
  constructor arguments in the object store and max_restarts > 0" (Ray Train's own actor). No Python
  logger carries them, and Ray offers no per-message switch for C++ lines: ``RAY_BACKEND_LOG_LEVEL``
  is one threshold for all of them (ERROR lines always also go to the process's stderr, see
  ``RayLog::StartRayLog`` in Ray's src/ray/util/logging.cc), so raising it would hide real errors
  too. A worker's stderr reaches this console through Ray's log-to-driver stream, and that is where
  they are dropped (:func:`install_worker_line_filter`, in the driver); the worker's log file keeps them.
  A driver's OWN C++ lines go straight to its stderr (file descriptor 2) and cannot be filtered
  this way: for those, the cause is avoided (the same line for a Ray Data actor pool, which Ray
  Data creates with max_restarts=-1 and its arguments in the object store: alip.explore.job scores
  in Ray Data tasks instead, see there).
* Deprecation warnings raised inside Ray's own modules about Ray's own internals
  (``DeprecationWarning``/``FutureWarning`` whose module is ``ray.*``); ours and those of other
  libraries still show.

Set ``ALIP_RAY_VERBOSE=1`` to see everything again.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

VERBOSE_ENV = "ALIP_RAY_VERBOSE"

#: (logger name, message substring): records known to be harmless. Logger-level filters only see
#: records logged on exactly that logger, so each entry names the module that logs it.
HARMLESS_MESSAGES: tuple[tuple[str, str], ...] = (
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
     "Failed to query Ray Train Controller actor state"),
    ("ray.train.v2._internal.execution.preemption", "PreemptionWatcher poll failed"),
    ("ray.train.v2._internal.callbacks.preemption_callback", "Failed to kill PreemptionWatcher actor"),
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray cluster"),
    ("ray.data._internal.execution.streaming_executor", "Starting execution of Dataset"),
    ("ray.data._internal.execution.streaming_executor", "Execution plan of Dataset"),
    # Ray Data's INFO line at the end of each dataset (its own logging setup shows INFO on the
    # driver); our jobs print their own summary. A failed execution still shows (and raises).
    ("ray.data._internal.execution.streaming_executor", "execution finished in"),
    # Ray Data's notice that its progress bars are off: we turn them off (QUIET_ENV), on purpose.
    ("ray.data._internal.progress", "Progress bars disabled"),
    ("ray.data._internal.progress", "Progress will be logged because stdout is a non-interactive terminal"),
)

#: Lines of Ray's C++ core worker, printed from inside a worker process, known to be harmless: each
#: entry's substrings must ALL be in the line. Dropped from this console (the worker's log file keeps
#: them) by :func:`install_worker_line_filter`; see the module docstring for why there, and not in Ray.
HARMLESS_WORKER_LINES: tuple[tuple[str, ...], ...] = (
    # core_worker.cc, ERROR, once per process (ray-project/ray#53727): an actor created with
    # max_restarts != 0 whose constructor arguments hold object refs may fail to restart if those
    # objects are lost. Ray Train's controller creates its PreemptionWatcher that way for every
    # worker group (max_restarts=-1; the arguments are the train workers' live actor handles) and
    # kills it with the worker group; the next group gets a new one. Ray Train's actor, not ours:
    # nothing to act on.
    ("Actor with class name: 'PreemptionWatcher'", "has constructor arguments in the object store"),
)

#: Loggers whose INFO lines are chatter on a console that already shows our progress lines.
CHATTY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")

# Ray's env settings for a quiet console; setdefault, so a user's own value always wins.
QUIET_ENV = {
    # Ray Train V2 is the default in 2.60; setting it explicitly skips the "V2 is enabled" notices.
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Data's periodic progress dumps (a wall of text every 10 s when stdout is not a TTY).
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Repeated identical worker lines are folded ("[repeated 7x across cluster]").
    "RAY_DEDUP_LOGS": "1",
}


class _DropHarmless(logging.Filter):
    def __init__(self, needles: tuple[str, ...]):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.needles)


def _verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def setup_worker_process() -> None:
    """Each Ray worker's start-up hook (``worker_process_setup_hook``): the log filters, plus the
    worker's own cluster as ``RAY_ADDRESS``. Ray Train V2's placement-group cleaner queries the
    State API with no address, which auto-detects "a" Ray on the machine: with several (another
    user's, a stale session) it picks the latest, not necessarily its own."""
    import ray

    if not os.environ.get("RAY_ADDRESS") and ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    install_log_filters()
    _quiet_cleaner_thread()


#: Ray Train V2's placement-group cleaner thread; it needs the State API (the dashboard), which a
#: private local Ray runs without. Its thread then ends with a traceback: harmless here, because
#: a private Ray's placement groups die with the driver anyway.
_CLEANER_THREAD = "PlacementGroupCleanerMonitor"


def _quiet_cleaner_thread() -> None:
    import threading

    if _verbose() or getattr(threading.excepthook, "_alip_quiet", False):
        return
    default = threading.excepthook

    def hook(args):
        thread = getattr(args, "thread", None)
        if thread is not None and thread.name == _CLEANER_THREAD and issubclass(args.exc_type, Exception):
            logging.getLogger(__name__).debug("%s ended: %s", _CLEANER_THREAD, args.exc_value)
            return
        default(args)

    hook._alip_quiet = True
    threading.excepthook = hook


def install_log_filters() -> None:
    """Drop :data:`HARMLESS_MESSAGES` on their loggers (idempotent); also run in every Ray worker,
    where the Train controller and the PreemptionWatcher actually log."""
    if _verbose():
        return
    by_logger: dict[str, list[str]] = {}
    for name, needle in HARMLESS_MESSAGES:
        by_logger.setdefault(name, []).append(needle)
    for name, needles in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(tuple(needles)))
    # Ray's deprecation notices about its own internals, raised from inside ray.* modules.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")


def _harmless_worker_line(line: str) -> bool:
    return any(all(n in line for n in needles) for needles in HARMLESS_WORKER_LINES)


#: The handler name under which Ray's driver prints its workers' output (ray._private.worker).
_PRINT_HANDLER = "ray_print_logs"


def _drop_harmless_lines(handler):
    def filtered(data):
        lines = data.get("lines") or []
        kept = [line for line in lines if not _harmless_worker_line(line)]
        if len(kept) != len(lines):
            if not kept:
                return
            data = {**data, "lines": kept}
        handler(data)

    filtered._alip_filtered = True
    return filtered


def install_worker_line_filter() -> None:
    """Drop :data:`HARMLESS_WORKER_LINES` from the worker output Ray prints on this driver's console
    (idempotent; after ``ray.init``, which installs Ray's printer). Ray forwards each worker's
    stdout/stderr lines to the driver, which hands each batch to the handlers of its log dispatcher
    (``ray._private.ray_logging.global_worker_stdstream_dispatcher``; Ray's own is "ray_print_logs");
    this wraps Ray's printer so those lines never reach it. Without that dispatcher (another Ray
    version) it does nothing: the lines then show, nothing else changes."""
    if _verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, handler in list(getattr(dispatcher, "handlers", [])):
        if name == _PRINT_HANDLER and not getattr(handler, "_alip_filtered", False):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, _drop_harmless_lines(handler))


def quiet_ray() -> None:
    """Quiet-console settings for this process (before ``ray.init``) and the Ray it starts."""
    if _verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "ray.data" in sys.modules and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":
        # Ray Data read the variable when it was imported (before us): set the live context too.
        # It travels with each dataset to the cluster, also one we only attach to (whose workers
        # have their own environment).
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    install_log_filters()


# Settings of the raylet (the per-node Ray process), set in its environment when it starts: by
# init_local_ray for a private local Ray, by cluster.yaml's `ray start` lines on a cluster
# (tests/test_cluster_yaml.py checks they agree). A node kills a task's worker process after it
# idles 1 s (Ray's default) once the node runs more worker processes than it has CPUs, and train
# workers and Ray's own actors count. The pretraining read tasks (alip.pretrain.rank_reader) idle
# about a step between items, so on small nodes each item started a fresh process (importing torch:
# seconds of CPU). Measured, tiny preset, 2 workers, 2 CPUs, 30 steps: 32 samples/s with Ray's
# default, 86 with 10 s, the same as the earlier single Ray Data pipeline (86). Only the idle time
# changes: the cap on worker processes stays.
RAYLET_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "10000"}

# How fast a dead node is noticed, set on the cluster's `ray start` lines (cluster.yaml; read by the
# GCS on the head; tests/test_cluster_yaml.py checks them). Ray's defaults (a health check every
# 3 s, a 10 s timeout, dead after 5 misses) take 15 s for a node whose raylet refuses connections
# and up to ~50 s for one that vanished silently (a terminated instance drops packets). Until then
# Ray Train's poll of a worker there hangs and its survivors can sit in a collective. With
# 1 s / 1 s / 5 misses: 5 s refused, ~10 s silent. The price: a node whose raylet cannot answer for
# 5 s in a row (a network partition, a raylet stalled that long) is declared dead for good, its
# workers killed, and the group restarts without it (one restart, seconds). Elastic restarts do
# not wait for the GCS (alip.pretrain.elastic probes raylets itself); this bounds how long a node
# that vanished keeps the old group from stopping. Not set for local Rays and the tests' simulated
# clusters: on a 2-core box running the suite a raylet can stall for seconds, and a false death
# there is a flaky test, not a real trade-off.
GCS_HEALTH_CHECK_ENV = {"RAY_health_check_period_ms": "1000",
                        "RAY_health_check_timeout_ms": "1000",
                        "RAY_health_check_failure_threshold": "5"}


def _runtime_env(runtime_env: dict | None) -> dict | None:
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", "alip.ray_setup.setup_worker_process")
    return env


def _init_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    kwargs["runtime_env"] = _runtime_env(kwargs.get("runtime_env"))
    kwargs.setdefault("log_to_driver", True)
    if not _verbose():
        kwargs.setdefault("logging_level", logging.WARNING)
    return kwargs


def _describe_cluster() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    gpus = res.get("GPU", 0)
    return f"{len(nodes)} node(s), {res.get('CPU', 0):g} CPUs" + (f", {gpus:g} GPUs" if gpus else ", no GPU")


#: The GCS address of the private local Ray init_local_ray started in this process, if any. The
#: address, not a flag: a process that started one, shut it down and attached to a cluster later (a
#: notebook, a test session) is on that cluster, not on a private Ray.
_PRIVATE_RAY_GCS: str | None = None


def is_private_local_ray() -> bool:
    """Whether the Ray this process uses is a private local one it started (no other node can join)."""
    import ray

    return (_PRIVATE_RAY_GCS is not None and ray.is_initialized()
            and ray.get_runtime_context().gcs_address == _PRIVATE_RAY_GCS)


def init_local_ray(num_cpus: int | None = None, *, log=print, **kwargs) -> None:
    """Start a private local Ray for this process (``address="local"``) and say so.

    ``kwargs`` go to ``ray.init`` (e.g. ``runtime_env``, ``object_store_memory``). The dashboard
    is off unless ``include_dashboard=True`` is passed."""
    import ray

    quiet_ray()
    for name, value in RAYLET_ENV.items():
        os.environ.setdefault(name, value)  # the raylet ray.init starts inherits this environment
    kwargs = _init_kwargs(kwargs)
    kwargs.setdefault("include_dashboard", False)
    global _PRIVATE_RAY_GCS
    log(f"[ray] starting a private local Ray for this run (address='local', "
        f"{num_cpus if num_cpus is not None else os.cpu_count()} CPUs); it stops when this process ends")
    ray.init(address="local", num_cpus=num_cpus, **kwargs)
    _PRIVATE_RAY_GCS = ray.get_runtime_context().gcs_address
    install_worker_line_filter()


def attach_ray(address: str, *, log=print, **kwargs) -> None:
    """Attach to the Ray cluster at ``address`` (``host:port``, ``ray://...`` or ``auto``) and say
    which cluster it found."""
    import ray

    if not address or address == "local":
        raise ValueError(f"attach_ray needs a cluster address, got {address!r}; use init_local_ray() for a private Ray")
    quiet_ray()
    ray.init(address=address, **_init_kwargs(kwargs))
    install_worker_line_filter()
    found = ray.get_runtime_context().gcs_address
    log(f"[ray] attached to the Ray cluster at {found} (asked for {address!r}): {_describe_cluster()}")


def connect_ray(address: str | None = None, *, num_cpus: int | None = None, log=print, **kwargs) -> bool:
    """Ray for a job or command: ``address`` or ``$RAY_ADDRESS`` (what ``ray job submit`` sets)
    attaches; neither, or ``"local"``, starts a private local Ray. Does nothing when Ray is already
    initialised in this process. Returns True when this call connected."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        init_local_ray(num_cpus, log=log, **kwargs)
    else:
        attach_ray(address, log=log, **kwargs)
    return True
