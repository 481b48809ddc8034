"""Timing and memory helpers shared by the benchmark scripts (one process per measured model)."""
from __future__ import annotations
import os, resource, time
from typing import Callable

import torch


def rss_mib() -> float:
    "Current resident set size of this process (Linux /proc), MiB."
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    "Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(dev: torch.device):
    "Wait for queued GPU work so wall-clock timings are real."
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def time_steps(step: Callable[[], torch.Tensor], dev: torch.device, warmup: int, steps: int):
    "Run `warmup` untimed then `steps` timed calls of `step`; return (seconds per step, last step's result)."
    for _ in range(warmup): step()
    sync(dev)
    times, out = [], None
    for _ in range(steps):
        t0 = time.perf_counter(); out = step(); sync(dev); times.append(time.perf_counter() - t0)
    return times, out
