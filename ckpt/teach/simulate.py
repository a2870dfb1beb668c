"""`ckpt simulate`: the pre-copy model. Round 0 sends the memory; each later round sends what the
process wrote while the previous round was on the wire; the stop rule (ckpt/migrate/policy.py, the
same functions `ckpt migrate` calls) decides after each round; the final, frozen round sends what
the last round left dirty. The report has the shape of `ckpt migrate --json`.

What the process writes in a round of length T is the number of distinct pages it writes in T:
- `--dirty-rate R [--hot H]`: uniform random writes of R bytes/s over the memory (or a hot set of H):
  N (1 - exp(-R T / (PAGE N))) distinct pages, the expectation (cf. mig_mon, dirtier -p random|hot);
- a `dirtyrate --json` trace: its writable-working-set curve WSS(T) (Clark et al.), interpolated;
- a `dirtyrate --json --pages` trace: its pages replayed in time (looping), so re-dirtying of hot
  pages is what the process did, not an assumption."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from ckpt.errors import CkptError
from ckpt.migrate import policy as rules
from ckpt.migrate.source import RoundReport
from ckpt.migrate.throttle import parse_rate

PAGE = rules.PAGE
# Layer bytes beyond the page data and fixed costs, calibrated on `ckpt migrate` over loopback with
# incompressible pages (docs/precopy.md): zstd leaves random pages at ~4096 bytes, a live layer adds
# ~6 KiB of records, the final one ~4 KiB more than its pages (its state compresses well). A live
# round costs a freeze, a scan and a layer write beyond its bytes; the final round the whole state,
# the destination's completion of the restore and its RUNNING.
PAGE_OVERHEAD = 0
LIVE_LAYER_BYTES = 6 << 10
FINAL_LAYER_BYTES = 4 << 10
ROUND_OVERHEAD_MS = 20.0
FINAL_OVERHEAD_MS = 50.0
MAX_TRACE_BYTES = 256 << 20
MAX_TRACE_PAGES = 1 << 25  # page addresses held for a replay (256 MiB of them)
MAX_ROUNDS = 100_000


def parse_size(s: str) -> int:
    """'64M', '1G', '4096K', '1.5G', '65536' (bytes) -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KkMmGgTt]?)(?:i?[Bb])?\s*", s)
    if not m:
        raise CkptError(f"{s!r} is not a size (examples: 64M, 1G, 4096K)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    v = int(float(m.group(1)) * mult)
    if not PAGE <= v <= 1 << 44:
        raise CkptError(f"size {s!r} is out of range (4K .. 16T)")
    return v


class WriteModel(Protocol):
    name: str

    def written(self, t0: float, t1: float) -> int:
        """Distinct pages written between process times t0 and t1 (seconds)."""
        ...


@dataclass
class Uniform:
    rate_pages: float  # pages written per second (a page counted per write)
    pages: int  # over how many pages the writes fall
    name: str = "uniform"

    def written(self, t0: float, t1: float) -> int:
        if self.pages <= 0 or t1 <= t0:
            return 0
        return round(self.pages * -math.expm1(-self.rate_pages * (t1 - t0) / self.pages))


@dataclass
class WssCurve:
    window_s: list[float]
    pages: list[float]
    limit: int  # never more than the memory
    name: str = "wss curve"

    def written(self, t0: float, t1: float) -> int:
        t = t1 - t0
        if t <= 0 or not self.window_s:
            return 0
        w, p = self.window_s, self.pages
        if t <= w[0]:
            v = p[0] * t / w[0]
        elif t >= w[-1]:
            # Beyond the longest window measured: the curve's last slope (a WSS only flattens).
            slope = (p[-1] - p[-2]) / (w[-1] - w[-2]) if len(w) > 1 and w[-1] > w[-2] else 0.0
            v = p[-1] + max(slope, 0.0) * (t - w[-1])
        else:
            v = float(np.interp(t, w, p))
        return min(round(v), self.limit)


@dataclass
class Replay:
    """A recorded trace of per-interval page sets, replayed in process time (looping at its end).
    A round that covers part of an interval takes that part of its pages, in an order shared by every
    interval: each page has one seeded phase in the trace, as if written at the same moment of each
    interval. A hot page that the trace saw in every interval is then in every window of one
    interval's length, as it is in the process: the tail of one interval and the head of the next,
    or of the trace's last interval and its first where a round wraps around, hold all of it. With an
    order drawn per interval, such a window took two independent shares and missed a hot page with
    the odds of both, a dip in the dirty set that was only the model's (and that P.Haul's growth
    rule then read as growth on the round after)."""

    starts: list[float]  # seconds
    ends: list[float]
    sets: list[np.ndarray]
    name: str = "trace replay"
    _order: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        pages = np.unique(np.concatenate(self.sets)) if self.sets else np.empty(0, np.uint64)
        phase = np.random.default_rng(0).random(len(pages))
        self._order = [s[np.argsort(phase[np.searchsorted(pages, s)], kind="stable")] for s in self.sets]
        self.length = self.ends[-1] if self.ends else 0.0

    def _segments(self, t0: float, t1: float) -> list[tuple[float, float]]:
        if self.length <= 0:
            return []
        if t1 - t0 >= self.length:
            return [(0.0, self.length)]
        a = t0 % self.length
        b = a + (t1 - t0)
        if b <= self.length:
            return [(a, b)]
        return [(a, self.length), (0.0, b - self.length)]

    def written(self, t0: float, t1: float) -> int:
        parts = []
        for a, b in self._segments(t0, t1):
            for s, e, pages in zip(self.starts, self.ends, self._order, strict=True):
                lo, hi = max(a, s), min(b, e)
                if hi <= lo or not len(pages):
                    continue
                n = len(pages)
                f0, f1 = (0.0, 1.0) if e - s <= 0 else ((lo - s) / (e - s), (hi - s) / (e - s))
                # Rounded outwards: adjoining parts of one interval never leave a page between them.
                parts.append(pages[math.floor(f0 * n + 1e-9) : math.ceil(f1 * n - 1e-9)])
        return len(np.unique(np.concatenate(parts))) if parts else 0


@dataclass
class Options:
    memory_pages: int
    bandwidth: float  # bytes/s
    model: WriteModel
    policy: str = "qemu"
    downtime_limit_ms: float = rules.DEFAULT_DOWNTIME_MS
    max_rounds: int | None = None
    auto_converge: bool = False
    round_overhead_ms: float = ROUND_OVERHEAD_MS
    final_overhead_ms: float = FINAL_OVERHEAD_MS


@dataclass
class SimResult:
    policy: str
    stop_reason: str
    rounds: int
    downtime_ms: float
    total_ms: float
    bytes_sent: int
    memory_bytes: int
    bandwidth: float
    model: str
    threshold_pages: float | None
    round_reports: list[RoundReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("round_reports")
        d["event"] = "done"
        d["simulated"] = True
        d["sent_per_memory"] = round(self.bytes_sent / self.memory_bytes, 3) if self.memory_bytes else None
        return d


def _wire(pages: int, final: bool) -> int:
    return pages * (PAGE + PAGE_OVERHEAD) + (FINAL_LAYER_BYTES if final else LIVE_LAYER_BYTES)


def run(o: Options) -> SimResult:
    """The rounds of `ckpt migrate` (source.migrate), with time and writes from the model."""
    from ckpt.teach.plot import threshold_pages

    if o.bandwidth <= 0 or o.memory_pages <= 0:
        raise CkptError("simulate needs a positive memory size and bandwidth")
    rule = rules.get_rule(o.policy)
    limits = rules.Limits(o.downtime_limit_ms, o.max_rounds or rules.DEFAULT_MAX_ROUNDS)
    history: list[rules.Round] = []
    reports: list[RoundReport] = []
    warnings: list[str] = []
    clock = tau = 0.0  # wall time, and the process's own time (slower when throttled)
    throttle = 0.0
    pages = o.memory_pages
    index = 0
    while True:
        wire = _wire(pages, False)
        send = wire / o.bandwidth
        secs = o.round_overhead_ms / 1e3 + send
        history.append(rules.Round(index, pages, wire, secs, o.memory_pages, send))
        decision = rules.decide(rule, history, limits)
        # The process wrote this round's successor while this round was sent, under the throttle
        # decided one round earlier (source.migrate changes it only after the round's decision).
        running = 1 - throttle
        if o.auto_converge and not decision.stop and rules.throttle_due(history):
            throttle = min(0.99, 0.2 if throttle == 0 else throttle + 0.1)
        reports.append(
            RoundReport(
                round=index,
                kind="live",
                duration_ms=round(secs * 1e3, 3),
                pages_dirty=pages,
                pages_sent=pages,
                bytes_wire=wire,
                freeze_ms=0.0,
                dirty_rate=round(rules.dirty_rate(history), 1),
                bandwidth=round(rules.bandwidth(history), 1),
                predicted_downtime_ms=round(min(rules.predicted_downtime_ms(history), 1e9), 3),
                throttle=round(throttle, 2),
                decision=decision.reason,
            )
        )
        # What the process writes from this round's freeze to the next one's is the next dirty set.
        nxt = o.model.written(tau, tau + secs * running)
        tau += secs * running
        clock += secs
        if decision.stop:
            break
        pages = min(nxt, o.memory_pages)
        index += 1
    if (warn := rules.convergence_warning(history, decision, o.bandwidth)) is not None:
        warnings.append(warn + ("" if o.auto_converge else "; --auto-converge would throttle the process"))
    final_pages = min(nxt, o.memory_pages)
    fwire = _wire(final_pages, True)
    downtime = o.final_overhead_ms / 1e3 + fwire / o.bandwidth
    reports.append(
        RoundReport(
            round=index + 1,
            kind="final",
            duration_ms=round(downtime * 1e3, 3),
            pages_dirty=final_pages,
            pages_sent=final_pages,
            bytes_wire=fwire,
            freeze_ms=round(downtime * 1e3, 3),
            dirty_rate=0.0,
            bandwidth=round(fwire / downtime, 1),
            predicted_downtime_ms=0.0,
            throttle=0.0,
            decision="restored at the destination (modelled)",
        )
    )
    return SimResult(
        policy=o.policy,
        stop_reason=decision.reason,
        rounds=len(history),
        downtime_ms=round(downtime * 1e3, 3),
        total_ms=round((clock + downtime) * 1e3, 3),
        bytes_sent=sum(h.bytes_wire for h in history) + fwire,
        memory_bytes=o.memory_pages * PAGE,
        bandwidth=o.bandwidth,
        model=o.model.name,
        threshold_pages=threshold_pages(o.policy, o.bandwidth, o.downtime_limit_ms),
        round_reports=reports,
        warnings=warnings,
    )


# -- traces ------------------------------------------------------------------------------------------
def load_trace(path: str, memory_pages: int | None) -> tuple[WriteModel, int]:
    """A `ckpt dirtyrate --json` recording -> (model, memory pages). Untrusted: every field checked."""
    from ckpt.teach.dirtyrate import from_runs

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TRACE_BYTES + 1)
    except OSError as e:
        raise CkptError(f"cannot read trace {path}: {e.strerror or e}") from None
    if len(raw) > MAX_TRACE_BYTES:
        raise CkptError(f"trace {path} is larger than {MAX_TRACE_BYTES >> 20} MiB")
    intervals: list[dict[str, Any]] = []
    summary: dict[str, Any] | None = None
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise CkptError(f"trace {path}, line {n}: not JSON") from None
        if not isinstance(obj, dict):
            raise CkptError(f"trace {path}, line {n}: not an object")
        if "wss" in obj:
            summary = obj
        elif "t_ms" in obj:
            intervals.append(obj)
    if not intervals:
        raise CkptError(f"trace {path} holds no interval (make one with `ckpt dirtyrate --json`)")

    def num(o: dict[str, Any], k: str, lo: float = 0.0) -> float:
        v = o.get(k)
        if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v < 1e12:
            raise CkptError(f"trace {path}: bad {k!r} in {str(o)[:80]}")
        return float(v)

    for iv in intervals:
        for k in ("t_ms", "interval_ms", "pages_dirty"):
            num(iv, k)
    mem = memory_pages
    if mem is None and summary is not None:
        mem = int(num(summary, "memory_pages", 1))
    if mem is None:
        raise CkptError(f"trace {path} has no summary line with memory_pages: give --memory")
    if all("pages" in iv for iv in intervals):
        ends = [num(iv, "t_ms") / 1e3 for iv in intervals]
        starts = [e - num(iv, "interval_ms") / 1e3 for e, iv in zip(ends, intervals, strict=True)]
        sets, budget = [], MAX_TRACE_PAGES
        for iv in intervals:
            sets.append(from_runs(iv["pages"], budget))
            budget -= len(sets[-1])
        return Replay(starts, ends, sets), mem
    if summary is not None and isinstance(summary.get("wss"), list) and summary["wss"]:
        pts = sorted(
            (num(p, "window_ms") / 1e3, num(p, "pages")) for p in summary["wss"] if isinstance(p, dict)
        )
        return WssCurve([w for w, _ in pts], [p for _, p in pts], mem), mem
    total = sum(num(iv, "pages_dirty") for iv in intervals)
    secs = sum(num(iv, "interval_ms") for iv in intervals) / 1e3
    return Uniform(total / secs if secs else 0.0, mem, name="uniform (trace mean)"), mem


def options_from_args(a: argparse.Namespace) -> Options:
    if a.max_rounds is not None and not 1 <= a.max_rounds <= MAX_ROUNDS:
        raise CkptError(f"--max-rounds must be between 1 and {MAX_ROUNDS}")
    if not 0 < a.downtime_limit <= 1e9:  # also refuses NaN
        raise CkptError("--downtime-limit must be a positive number of ms")
    bw = parse_rate(a.bandwidth)
    mem = parse_size(a.memory) // PAGE if a.memory else None
    model: WriteModel
    if a.trace:
        if a.hot:
            raise CkptError("--hot goes with --dirty-rate, not with --trace")
        model, mem_pages = load_trace(a.trace, mem)
    else:
        if mem is None:
            raise CkptError("--dirty-rate needs --memory")
        mem_pages = mem
        rate = _rate_or_zero(a.dirty_rate)
        hot = parse_size(a.hot) // PAGE if a.hot else mem_pages
        if hot > mem_pages:
            raise CkptError("--hot is larger than --memory")
        model = Uniform(rate / PAGE, hot, name=f"uniform {rate / 1e6:g} MB/s over {hot} pages")
    for name in ("round_overhead", "final_overhead"):
        v = getattr(a, name)
        if v is not None and not 0 <= v <= 1e6:  # also refuses NaN
            raise CkptError(f"--{name.replace('_', '-')} must be between 0 and 1e6 ms")
    return Options(
        memory_pages=mem_pages,
        bandwidth=bw,
        model=model,
        policy=a.policy,
        downtime_limit_ms=a.downtime_limit,
        max_rounds=a.max_rounds,
        auto_converge=a.auto_converge,
        round_overhead_ms=ROUND_OVERHEAD_MS if a.round_overhead is None else a.round_overhead,
        final_overhead_ms=FINAL_OVERHEAD_MS if a.final_overhead is None else a.final_overhead,
    )


def _rate_or_zero(s: str) -> float:
    """A dirty rate of 0 is a valid process (an idle one); parse_rate refuses rates below 1 KiB/s."""
    if re.fullmatch(r"\s*0+(\.0*)?\s*[A-Za-z/]*\s*", s):
        return 0.0
    return parse_rate(s)


def summarize(results: Sequence[SimResult]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in results]
