"""Each training rank's read-ahead: a fixed window of Ray tasks that read and decode its own rows.

Rank r of W trains a fixed slice of every global batch (alip.pretrain.stream.rank_slice). Its rows
come as read items (a few whole steps of its slice each, `rank_items`); this module keeps
`read_ahead` of them in flight as plain Ray tasks and hands them back in step order:

    rank's step k  <-  ray.get(item holding step k)     [item k+1 .. k+read_ahead decoding]

Why Ray tasks and not Ray Data here (Ray Data runs the explore job):
- a deterministic global batch needs each rank to get *its* rows in *its* order. Ray Train's
  `streaming_split` deals blocks to whichever rank asks first, so which rows make a global batch
  depends on the worker count and on timing (tests/test_pretrain_job.py compares 1 and 2 workers);
- one Ray Data pipeline per rank does not work on a busy cluster: Ray Data 2.60 sizes every
  running dataset from the share the cluster-wide autoscaling coordinator reserves for it, and it
  splits a node's leftover CPUs between concurrent datasets by integer division
  (`ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py`,
  `share = amount // len(type_eligible)`). With W ranks' pipelines and fewer than W spare CPUs on
  a node, each gets 0 CPUs there, and a killed group's reservations linger for
  RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S (180 s). That fits what we saw (read from the Ray
  source, not reproduced alone): after a preemption the restarted group's pipelines logged "Cluster
  resources are not enough to run any task" and the run stalled (tests/test_pretrain_elastic.py,
  1-CPU nodes).
Plain tasks are scheduled by Ray core against the node's real free CPUs. Ray core also gives
what Ray Data would: retries when a task's node dies (`max_retries`), and fate-sharing (a dead
train worker's tasks are cancelled with it, so a restarted group starts with free CPUs).

What a kill loses is bounded and known: the item being trained + `read_ahead` items in flight.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

# Node loss is the failure a read task can hit that a retry fixes (a bad row is skipped inside the
# task, alip.pretrain.data); a Python exception is not retried: it is a bug or unreachable storage
# and fails the worker with its message, which Ray Train's FailureConfig then handles.
READ_TASK_MAX_RETRIES = 3


def read_ahead_items(read_item: Callable[..., dict], n_items: int, read_ahead: int, *, num_cpus: float,
                     kwargs: dict) -> Iterator[dict]:
    """Yield `read_item(item=i, **kwargs)` for i = 0 .. n_items - 1, in order, each computed in a Ray
    task, at most `read_ahead` of them submitted ahead of the one being consumed. Ray's default
    (hybrid) scheduling runs a task on the submitting node, the train worker's, while that node is
    less than half busy and spills it to other nodes (e.g. CPU workers) beyond that: decoded pixels
    usually stay local, and a GPU node with few CPUs is not the limit. Large shared arguments (the
    read units) are put in the object store once, not pickled into every task."""
    import ray

    if n_items <= 0:
        return
    if read_ahead < 1:
        raise ValueError(f"read_ahead must be >= 1, got {read_ahead}")
    task = ray.remote(read_item).options(num_cpus=num_cpus, max_retries=READ_TASK_MAX_RETRIES)
    shared = {k: ray.put(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
    pending: deque = deque()
    next_item = 0
    try:
        while next_item < n_items or pending:
            while next_item < n_items and len(pending) < read_ahead + 1:  # + the one consumed next
                pending.append(task.remote(item=next_item, **shared))
                next_item += 1
            yield ray.get(pending.popleft())
    finally:
        for ref in pending:  # the consumer stopped early (--max-steps, an error): stop decoding
            ray.cancel(ref)
