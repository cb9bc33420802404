"""CPU seconds of a process tree, read one way by every bench.

The benches run the broker, bridge, Triton and devices as processes of their own on shared
2-core hosts, so each figure they print per process comes from the same reading.
"""

from __future__ import annotations

import contextlib

import psutil


def cpu_seconds(pid: int | None = None, *, tree: bool = True) -> float:
    """User plus system CPU seconds of ``pid`` (None: this process) and, with ``tree``, of every
    live process under it; a process that is gone counts nothing."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if tree else [root]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total
