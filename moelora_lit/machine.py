"""The machine's speed beside a timing: float32 matmul GFLOPS, so absolute times from different machines compare."""

from __future__ import annotations

import math
import time

import torch


def matmul_gflops(n: int = 1024, reps: int = 5, device: torch.device | str = "cpu", threads: int | None = None,
                  inner: int = 1) -> float:
    """float32 GFLOPS of an ``n x n`` matmul on ``device``, the best of ``reps`` timings of ``inner`` products each.

    On CPU it runs at ``threads`` threads (torch's thread count is restored afterwards) or, with None, at torch's
    current count.
    """
    device = torch.device(device)
    previous = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
        a @ b  # warm-up
        best = math.inf
        for _ in range(reps):
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                a @ b
            _sync(device)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 * inner / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
