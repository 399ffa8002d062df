"""Torch intra-op threads per process on the CPU: ``run.cpu_threads`` for training, ``--threads`` for inference,
and the toolkit's default policy where neither is given.

Why the toolkit sets the count instead of leaving it to torch or the launcher: torch starts one intra-op thread per
core, and ``accelerate launch --cpu --num_processes 1`` sets ``OMP_NUM_THREADS`` to the physical cores per process
(2 on a 2-core machine; a plain ``accelerate launch`` sets 1). OpenMP threads meet at a barrier after every
parallel region, so when another busy process takes one of the cores, every operator waits for the thread that was
descheduled: the demo training, about 8 iterations/s alone with 2 threads on 2 cores, fell to 0.3-0.6 iterations/s
beside one other CPU-bound process.

`default_cpu_threads` is the policy: **the cores available to each process on this machine, minus one, at least
one** (1 on a 2-core machine, 7 for one process on 8 cores, 3 for each of 2 processes on 8 cores). The core left
free absorbs data-loader workers and other jobs, so a busy neighbour delays one of several threads instead of the
barrier of every operator. Measured with `benchmarks/threads.py` on a 2-core machine (demo training, iterations/s,
alone / beside one busy-loop process): 1 thread 10.7 / 11.0; 2 threads 13.9 / 4.7; 2 threads with
``OMP_WAIT_POLICY=PASSIVE`` 8.2 / 6.6; ``accelerate launch --cpu --num_processes 1`` with its 2 threads 16.1 / 4.7
and with this default 12.1 / 10.9. The torch inference backend: 1 thread 9.7 / 9.1 images/s, 2 threads 12.3 / 3.9.
One thread gives up 20-30 % alone and keeps 90-100 % under load; two threads lose 65-70 % under load.
"""

from __future__ import annotations

import os

from imas_core.errors import ConfigError

__all__ = ["apply_cpu_threads", "available_cores", "default_cpu_threads"]


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def default_cpu_threads(world_size: int) -> int:
    """Torch intra-op threads for each process when the user set none: the available cores divided among this
    machine's processes (``LOCAL_WORLD_SIZE`` when a launcher sets it, else `world_size`), minus one, at least 1.

    Raises:
        ValueError: `world_size` < 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, available_cores() // max(1, local) - 1)


def apply_cpu_threads(requested: int | None, world_size: int, *, what: str = "run.cpu_threads") -> tuple[int, str]:
    """Set torch's intra-op threads to `requested`, or to `default_cpu_threads(world_size)` when it is None.

    Args:
        requested: the user's count (``run.cpu_threads``, ``--threads``) or None.
        world_size: processes sharing this machine.
        what: the setting's name, for the error message and the returned description.

    Returns:
        (the thread count set, where it came from: `what` or "default policy").

    Raises:
        ConfigError: `requested` < 1.
    """
    import torch

    if requested is not None and requested < 1:
        raise ConfigError(f"{what} must be >= 1 (or unset for the default policy), got {requested}")
    threads = requested if requested is not None else default_cpu_threads(world_size)
    torch.set_num_threads(threads)
    return threads, (what if requested is not None else "default policy")
