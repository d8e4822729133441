"""Measuring tools of the benchmarks (``study.benchmark``): the median time of a call, its peak tensor memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: ``torch.profiler``'s allocation events), the CPU share other
processes took meanwhile (Linux ``/proc``) and the run's environment. ``study.benchmark``'s docstring says exactly
what each number means.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

__all__ = ["MIB", "measure_time", "measure_peak_memory", "memory_note", "OtherCpuLoad", "own_cpu_ticks",
           "environment"]

MIB = 2.0**20
MEMORY_NOTE = (
    "peak MiB = peak tensor memory allocated during one call above what was allocated before it "
    "({how}); inputs, parameters and optimizer state excluded."
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    max_seconds: float | None = None,
) -> tuple[float, int]:
    """Median wall-clock time of ``fn()`` in milliseconds, and the number of timed calls.

    ``warmup`` untimed calls first (fewer, but at least one, once they took ``max_seconds``); then up to
    ``repeats`` timed calls, stopping early once ``max_seconds`` have passed and at least 3 calls (or ``repeats``
    if fewer) were timed. On CUDA every call is bracketed by
    ``torch.cuda.synchronize``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    device = torch.device(device)
    warm_start = time.perf_counter()
    for _ in range(warmup):
        fn()
        _sync(device)
        if max_seconds is not None and time.perf_counter() - warm_start > max_seconds:
            break  # a slow call: one warm-up is enough
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        enough = len(times) >= min(3, repeats)
        if max_seconds is not None and enough and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times) * 1e3, len(times)


def _cpu_allocation_events(prof) -> list[tuple[int, int]]:
    """(time ns, bytes; negative for a free) of every CPU allocation event a memory-profiling run recorded."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, int(fields.alloc_size)))
        stack.extend(node.children)
    return sorted(events)


# native log lines the CPU profiler writes on every start/stop (kineto), and the allocator's note that a block
# allocated before the profiled call was freed in it (its free is then not counted: the peak can only err upwards)
_PROFILER_NOISE = ("USDT:", "Memory block of unknown size was allocated before the profiling started")


@contextlib.contextmanager
def _filtered_native_stderr():
    """Capture file descriptor 2 (native and Python stderr) and re-emit it without the profiler's log noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. an embedded interpreter): leave it alone
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(marker in line for marker in _PROFILER_NOISE):
                    sys.stderr.write(line)
            sys.stderr.flush()


def measure_peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Peak bytes of tensor memory allocated during one call of ``fn()`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` (at the start). CPU: the maximum
    of the running sum of the allocations and frees ``torch.profiler`` records (``profile_memory=True``); NaN if
    this torch's profiler does not expose them.
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _filtered_native_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:
        events = _cpu_allocation_events(prof)
    except (AttributeError, RuntimeError):  # a torch whose profiler lacks the event tree
        return float("nan")
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return float(peak)


def memory_note(device: torch.device) -> str:
    """What the peak MiB columns mean on ``device``."""
    how = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "CPU: running sum of torch.profiler allocation events, one profiled call"
    )
    return MEMORY_NOTE.format(how=how)


class OtherCpuLoad:
    """Share of the machine's CPU time that *other* processes used between ``start()`` and ``stop()`` (Linux
    ``/proc``; None elsewhere): timings are only trustworthy when it stays near 0. This process's own children (data
    loader workers, the data preparation's subprocess) count as its own: ``own_cpu_ticks``."""

    def _read(self) -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), sum(fields[:8]) - idle, own_cpu_ticks()  # total, busy, own

    def start(self) -> None:
        try:
            self.begin = self._read()
        except (OSError, ValueError, IndexError):
            self.begin = None

    def stop(self) -> float | None:
        if self.begin is None:
            return None
        try:
            end = self._read()
        except (OSError, ValueError, IndexError):
            return None
        total, busy, own = (e - b for e, b in zip(end, self.begin))
        return max(0.0, 100.0 * (busy - own) / total) if total > 0 else None


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name: [0] state, [1] ppid, ... [11] utime, [12] stime,
    [13] cutime, [14] cstime (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def own_cpu_ticks() -> int:
    """CPU clock ticks used so far by this process, its children that have exited (and were waited for), and its
    live children (data loader workers) — Linux ``/proc``."""
    me = os.getpid()
    fields = _stat_fields(me)
    ticks = sum(int(v) for v in fields[11:15])
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                child = _stat_fields(entry)
            except (OSError, IndexError):  # gone meanwhile
                continue
            if child[1] == str(me):
                ticks += int(child[11]) + int(child[12])
    return ticks


def environment(device: torch.device) -> dict:
    """Device name, torch and monai versions and thread count of this run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    import monai

    return {"device": str(device), "device_name": name, "torch": torch.__version__, "monai": monai.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
