"""Ray start-up for every command that runs on Ray: join a cluster, or start a local Ray sized not to deadlock."""

from __future__ import annotations

import os
import socket

from pipeline.console.logs import note_ray_session

__all__ = ["check_ray_address", "init_ray"]


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing listens at a ``host:port`` Ray address (``ray.init`` would retry for minutes
    without a word). "auto", "local" and ``ray://`` addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({e.strerror or e}): start one there (`ray start --head`) or "
            "leave --address and RAY_ADDRESS unset to run on a local Ray"
        ) from None


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
        check_ray_address(address)
        ray.init(address=address, log_to_driver=False)
    else:
        num_cpus = local_cpus or max(5, os.cpu_count() or 1)
        # "local": a new instance even when `ray start` left a cluster on this machine (/tmp/ray/ray_current_cluster)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    note_ray_session()
