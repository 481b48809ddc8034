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
        t0 = time.perf_counter()
        out = step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return times, out


def add_process_args(p, what: str = "measurement"):
    "The flags every isolating bench script shares: --threads, --isolate, --out and the hidden --_child."
    import argparse
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help=f"one subprocess per {what} (auto: on CPU, where peak RSS needs a fresh process)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)


def run_child(script: str, spec: str) -> dict:
    "Re-run `script` with this process's arguments plus `--_child spec` (minus --out) in a fresh process; -> its JSON."
    import json, subprocess, sys
    cmd = [sys.executable, script, "--_child", spec] + list(sys.argv[1:])
    if "--out" in cmd:
        i = cmd.index("--out")
        del cmd[i:i + 2]                                                 # children never write the JSON
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0: raise RuntimeError(f"benchmark {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
