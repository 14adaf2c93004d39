"""Peak memory of a training step (torch.profiler allocation events on CPU) and a per-op profile."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from measure import MB, Variant, sync, train_step


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[(t.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def allocation_peak_cpu(fn: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator while ``fn`` runs.

    Uses torch.profiler with ``profile_memory=True``: every CPU allocation and free is an event with its
    size; the running sum from the start of ``fn`` is the live-bytes curve of the tensors made (or freed)
    inside ``fn``, and its maximum is the step's transient peak above what was alive before.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = running = 0
    for _, size in sorted(_allocation_events(prof)):
        running += size
        peak = max(peak, running)
    return peak


def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time, signed bytes) of every CPU allocation/free recorded by the profiler."""
    try:
        from torch._C._profiler import _EventType

        events: list[tuple[int, int]] = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
        if events:
            return events
    except (ImportError, AttributeError):  # private API moved: fall back to the public event list
        pass
    return [(e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage]


def persistent_bytes(v: Variant, batch: dict[str, torch.Tensor]) -> int:
    """Bytes alive before a step: parameters, buffers, optimizer state and the batch."""
    tensors = list(v.model.parameters()) + list(v.model.buffers()) + list(batch.values())
    if v.optimizer is not None:
        for state in v.optimizer.state.values():
            tensors.extend(t for t in state.values() if isinstance(t, torch.Tensor))
    return tensor_bytes(tensors)


def measure_memory(v: Variant, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> dict:
    """Peak memory of one (steady-state) training step of ``v``: persistent bytes + the step's transient peak."""
    device = batch["input_ids"].device
    gc.collect()
    persistent = persistent_bytes(v, batch)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        train_step(v, batch, amp)
        sync(device)
        transient = torch.cuda.max_memory_allocated(device) - start
        method = "cuda max_memory_allocated - memory_allocated before the step"
    else:
        transient = allocation_peak_cpu(lambda: train_step(v, batch, amp))
        method = "torch.profiler(profile_memory=True) CPU allocation events, running sum over the step"
    return {"persistent_mb": persistent / MB, "step_transient_peak_mb": transient / MB,
            "peak_memory_mb": (persistent + transient) / MB, "method": method}


def profile_step(v: Variant, batch: dict[str, torch.Tensor], amp: torch.dtype | None, steps: int = 3,
                 top: int = 15) -> list[dict]:
    """torch.profiler's top ops by self CPU time over ``steps`` training steps of ``v``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if batch["input_ids"].is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(v, batch, amp)
        sync(batch["input_ids"].device)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    out = []
    for e in rows[:top]:
        row = {"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
               "self_cpu_share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
        device_us = getattr(e, "self_device_time_total", None)
        if batch["input_ids"].is_cuda and device_us is not None:
            row["self_device_ms_per_step"] = device_us / 1e3 / steps
        out.append(row)
    return out
