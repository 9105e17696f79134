"""What Ray's own autoscaler v2 scheduler (the default of `ray up` in Ray 2.60) would launch for a
cluster.yaml and a list of resource requests: a second, independent opinion next to
alip/cluster_fit.py. Uses Ray internals (ray.autoscaler.v2), so it lives with the tests."""
from __future__ import annotations

import copy


def v2_launches(config: dict, demands: list[tuple[dict, int]], unavailable: tuple[str, ...] = ()):
    """({node type: count to launch}, number of infeasible requests) for `count` x `bundle` demands."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.core.generated.autoscaler_pb2 import ResourceRequest, ResourceRequestByCount

    autoscaling = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True)
    request = SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=autoscaling.get_node_type_configs(),
        max_num_nodes=config["max_workers"],
        resource_requests=[ResourceRequestByCount(request=ResourceRequest(resources_bundle=b), count=n)
                           for b, n in demands],
        # A type whose launches just failed (no spot capacity) scores 0 until it recovers.
        recoverable_resource_availabilities={t: 0.0 for t in unavailable})
    reply = ResourceDemandScheduler().schedule(request)
    return {l.instance_type: l.count for l in reply.to_launch}, len(reply.infeasible_resource_requests)
