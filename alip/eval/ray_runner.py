"""Thin Ray adapter: one Ray task per (model, dataset), each running alip.eval.suite.evaluate_dataset.

Each model is loaded once on the driver and put in the object store, so every task scores the
same weights (a random-init config name would otherwise differ per task) and nothing is re-read
from S3 per dataset. Tasks ask for one GPU when the cluster has any, else ``cpus_per_task`` CPUs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

import ray

from alip.eval.suite import EvalOptions, empty_results, evaluate_dataset, group_by_dataset, merge_dataset_result

log = logging.getLogger(__name__)


@ray.remote
def _evaluate_dataset_task(model, dataset: str, protocols: list[str], options: EvalOptions):
    """Returns (by_protocol, None) or (None, error message); data problems never kill the run."""
    import torch

    if ray.get_gpu_ids() and torch.cuda.is_available():
        model = model.to("cuda")
    else:
        # Stay inside the CPU share Ray granted this task instead of every task grabbing all cores.
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
        torch.set_num_threads(max(1, cpus))
    try:
        return evaluate_dataset(model, dataset, protocols, options), None
    except ValueError as e:  # DatasetNotFoundError, DatasetFormatError, MetricError, LinearProbeError
        if not options.skip_missing:
            raise
        return None, f"{type(e).__name__}: {e}"


def run_with_ray(models: Mapping[str, str], jobs: list[tuple[str, str]], options: EvalOptions, *,
                 load: Callable[[str], object], ray_address: str | None = None,
                 cpus_per_task: float = 1.0) -> dict[str, dict]:
    """{model label: checkpoint ref} x jobs -> {model label: results dict} (see alip.eval.suite)."""
    from alip.ray_setup import connect_ray

    connect_ray(ray_address)  # ray_address / $RAY_ADDRESS attaches (and says where), else a private local Ray
    gpus = ray.cluster_resources().get("GPU", 0)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_task}
    grouped = group_by_dataset(jobs)
    pending: dict = {}
    for name, ref in models.items():
        model_ref = ray.put(load(ref).cpu().eval())
        for dataset, protocols in grouped.items():
            fut = _evaluate_dataset_task.options(name=f"eval:{name}:{dataset}", **resources).remote(
                model_ref, dataset, protocols, options)
            pending[fut] = (name, dataset, protocols)
    log.info("submitted %d evaluation tasks (%s each)", len(pending), resources)
    results = {name: empty_results() for name in models}
    t0, total = time.time(), len(pending)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name, dataset, protocols = pending.pop(done[0])
        by_protocol, error = ray.get(done[0])
        merge_dataset_result(results[name], dataset, protocols, by_protocol, error)
        status = "missing/failed" if error else "ok"
        log.info("[%d/%d] %s / %s: %s (%.0fs)", total - len(pending), total, name, dataset, status, time.time() - t0)
    return results
