"""Multi-process setup: ``initialize`` wraps ``jax.distributed.initialize``.

Call it in every process before anything touches devices. On CPU it selects
gloo collectives and the number of local CPU devices; ``jax.devices()`` then
lists every process's devices and ``shard`` builds meshes across them.

Example (two processes, four CPU devices each, over loopback)::

    jaxinfer.sharding.distributed.initialize("127.0.0.1:12345", num_processes=2,
                                             process_id=rank, local_devices=4)
"""

from __future__ import annotations

import socket
from typing import Any

import jax

from .config import ShardingConfigError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a loopback coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_devices: int | None = None,
               cpu_collectives: str | None = "gloo", initialization_timeout: int = 120, **kwargs: Any) -> None:
    """Join a multi-process JAX job.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator (None: auto-detect on a cluster).
      num_processes, process_id: this job's size and this process's rank.
      local_devices: CPU devices this process simulates (sets ``jax_num_cpu_devices``); None leaves it.
      cpu_collectives: CPU collectives implementation ("gloo", "mpi"); None leaves the default.
      initialization_timeout: seconds to wait for the other processes.
      kwargs: passed to ``jax.distributed.initialize`` (e.g. ``local_device_ids``).
    """
    _check_args(coordinator_address, num_processes, process_id, local_devices, initialization_timeout)
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if local_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout, **kwargs)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_args(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                local_devices: int | None, initialization_timeout: int) -> None:
    """Refuse arguments JAX would abort the process on (or wait out the timeout for), naming the fix."""
    if coordinator_address is not None:
        host, sep, port = str(coordinator_address).rpartition(":") if isinstance(coordinator_address, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ShardingConfigError(f"coordinator_address must be 'host:port' with a port in 1..65535, "
                                      f"got {coordinator_address!r}")
    if num_processes is not None and (not _whole(num_processes) or num_processes < 1):
        raise ShardingConfigError(f"num_processes must be a positive integer, got {num_processes!r}")
    if process_id is not None:
        top = num_processes if num_processes is not None else None
        if not _whole(process_id) or process_id < 0 or (top is not None and process_id >= top):
            raise ShardingConfigError(f"process_id must be an integer in [0, num_processes"
                                      f"{'' if top is None else f' = {top}'}), got {process_id!r}")
    if local_devices is not None and (not _whole(local_devices) or local_devices < 1):
        raise ShardingConfigError(f"local_devices must be a positive integer (or None), got {local_devices!r}")
    if not _whole(initialization_timeout) or initialization_timeout < 1:
        raise ShardingConfigError(f"initialization_timeout must be a positive number of seconds, "
                                  f"got {initialization_timeout!r}")


def shutdown() -> None:
    jax.distributed.shutdown()


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()
