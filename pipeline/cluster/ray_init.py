"""Ray start-up for every command that runs on Ray: join a cluster, or start a local Ray sized not to deadlock."""

from __future__ import annotations

import os

from pipeline.console.logs import note_ray_session

__all__ = ["init_ray"]


def init_ray(address: str | None = None, *, local_cpus: int | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray with at least 5 logical CPU slots.

    Locally the slots are oversubscribed on purpose: a DCNN actor, two CRF actors, the plan reader and the encode +
    write tasks each need a slot, and on a 2-core machine 2 slots would deadlock the pools (ray-project/ray#44687)
    while the work itself fits (the reader and the writer are mostly idle).
    """
    import ray
    from ray.data import DataContext

    # Ray Data's per-operator progress output floods a non-interactive log; flow.execute logs progress instead.
    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        note_ray_session()  # the summary names the session's logs folder
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        num_cpus = local_cpus or max(5, os.cpu_count() or 1)
        # "local": a new instance even when `ray start` left a cluster on this machine (/tmp/ray/ray_current_cluster)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    note_ray_session()
