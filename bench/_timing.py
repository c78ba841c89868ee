"""Timing helpers shared by the ``bench/bench_*.py`` scripts.

Why this exists rather than ``torch.utils.benchmark``: the CPU benchmarks
here must read their weights from DRAM, not from the last-level cache, so
every timed call takes the *next* of several copies of its operands
(:func:`rotation_copies` says how many). Each call is timed on its own with
``time.perf_counter_ns`` and the summary is the median (plus min and p90),
which a stray context switch on a small shared machine moves far less than
the mean.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

ROTATION_BYTES = 64 << 20
"""Operands rotated per timed series exceed this (2x a 32 MB L3)."""


def rotation_copies(bytes_per_copy: int, min_total: int = ROTATION_BYTES) -> int:
    """How many copies of an operand of ``bytes_per_copy`` make more than ``min_total`` bytes (at least 2)."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be positive; got {bytes_per_copy}")
    return max(2, min_total // bytes_per_copy + 1)


@dataclass
class Stats:
    """Summary of one timed series, in seconds."""

    median_s: float
    min_s: float
    p90_s: float
    n: int

    @classmethod
    def of(cls, samples_s: Sequence[float]) -> "Stats":
        if not samples_s:
            raise ValueError("no samples")
        s = sorted(samples_s)
        p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]
        return cls(statistics.median(s), s[0], p90, len(s))

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(call: Callable[[int], object], i: int) -> float:
    t0 = time.perf_counter_ns()
    call(i)
    return (time.perf_counter_ns() - t0) * 1e-9


def time_rotating(
    series: Sequence[tuple[Callable[[int], object], int]],
    repeats: int,
    warmup: int = 3,
) -> list[list[float]]:
    """Seconds of each of ``repeats`` calls of every ``(call, n_copies)`` in ``series``.

    ``call(i)`` must use operand copy ``i``; summarize with :meth:`Stats.of`.

    The series are interleaved (one call of each, then the next) so that
    slow drift of the machine (another process, clock frequency) hits them
    alike; each steps through its own ``n_copies`` copies, so every call
    reads a copy that the traffic since its last use has pushed out of
    cache. Series j starts j/len(series) of the way round its copies: when
    two series share one set of copies (with and without an adapter, say),
    the second does not read the copy the first has just pulled into cache.
    ``warmup`` untimed rounds come first (thread pool, allocator, page faults).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    counters = [j * n // len(series) for j, (_, n) in enumerate(series)]

    def step(j: int) -> float:
        call, n_copies = series[j]
        i = counters[j] % n_copies
        counters[j] += 1
        return _timed(call, i)

    samples: list[list[float]] = [[] for _ in series]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            for j in range(len(series)):
                step(j)
        for _ in range(repeats):
            for j in range(len(series)):
                samples[j].append(step(j))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def auto_repeats(estimate_s: float, budget_s: float, lo: int, hi: int) -> int:
    """Repeats that fit ``budget_s`` at ``estimate_s`` per call, clamped to [lo, hi]."""
    if estimate_s <= 0:
        return hi
    return int(max(lo, min(hi, budget_s // estimate_s)))


def estimate_call_s(call: Callable[[int], object], n_copies: int, calls: int = 2) -> float:
    """Rough seconds per call (the fastest of a few, on different copies): sizes a timed series."""
    return min(_timed(call, i % n_copies) for i in range(calls))


# ---------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def l3_cache() -> Optional[str]:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _proc_stat_cpu() -> Optional[list[int]]:
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


class CpuMonitor:
    """CPU time that others took from this machine while a benchmark ran.

    On a small shared machine another process (a build, a test run)
    preempts the benchmark's threads, and multi-threaded calls that meet at
    barriers then take several times longer. ``foreign_cpu_s`` is the
    machine's busy CPU time (/proc/stat) less this process's own;
    ``steal_s`` is time the hypervisor gave to other guests. ``foreign_cores``
    (their sum over the wall time) well above zero means the numbers are not
    clean.
    """

    def __init__(self):
        self._stat0 = _proc_stat_cpu()
        self._own0 = self._own()
        self._t0 = time.perf_counter()

    TICK_SLACK_S = 0.03
    """/proc/stat counts whole clock ticks (10 ms): allow a few of them before calling a series busy."""

    @staticmethod
    def _own() -> float:
        return time.process_time()  # all threads of this process, exact (not tick-rounded)

    def result(self) -> dict:
        stat1, own1 = _proc_stat_cpu(), self._own()
        wall = time.perf_counter() - self._t0
        if self._stat0 is None or stat1 is None:
            return {"wall_s": wall, "foreign_cpu_s": None, "steal_s": None, "foreign_cores": None}
        d = [b - a for a, b in zip(self._stat0, stat1)]
        hz = os.sysconf("SC_CLK_TCK")
        # /proc/stat "cpu": user nice system idle iowait irq softirq steal ...
        busy = (d[0] + d[1] + d[2] + d[5] + d[6]) / hz
        foreign = max(0.0, busy - (own1 - self._own0))
        steal = d[7] / hz
        return {"wall_s": wall, "foreign_cpu_s": round(foreign, 3), "steal_s": round(steal, 3),
                "foreign_cores": round((foreign + steal) / wall, 3) if wall > 0 else None}

    @classmethod
    def busy(cls, result: dict, max_cores: float) -> bool:
        """Whether others used more than ``max_cores`` cores (beyond tick rounding) during the run."""
        if result["foreign_cpu_s"] is None:
            return False
        return result["foreign_cpu_s"] + result["steal_s"] > max_cores * result["wall_s"] + cls.TICK_SLACK_S


def wait_until_quiet(max_cores: float = 0.1, window_s: float = 1.0, max_wait_s: float = 120.0) -> float:
    """Sleep until others use under ``max_cores`` of the CPUs over a ``window_s`` window.

    Gives up after ``max_wait_s``; returns the seconds waited.
    """
    t0 = time.perf_counter()
    while True:
        m = CpuMonitor()
        time.sleep(window_s)
        busy = CpuMonitor.busy(m.result(), max_cores)
        waited = time.perf_counter() - t0
        if not busy or waited >= max_wait_s:
            return waited


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info(**extra) -> dict:
    """CPU model, usable cores, L3 size, Python and torch versions, plus ``extra``."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "l3": l3_cache(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    info.update(extra)
    return info


def machine_line(info: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.items() if v is not None)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table with padded columns (readable as plain text); numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]

    def fmt(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def _is_number(s: str) -> bool:
    try:
        float(s.rstrip("%x!"))
        return True
    except ValueError:
        return s in ("-", "")
