"""Stop rules: when to stop the live rounds and make the final (frozen) one.

Each rule is a pure function of the round history, so `ckpt migrate` and a simulator share them.
A rule returns a Decision whose reason is printed when it fires."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ckpt.errors import CkptError

PAGE = 4096
DEFAULT_DOWNTIME_MS = 300.0  # QEMU's, and the issue's; the 100 ms aim at a GiB needs --downtime-limit 100
DEFAULT_MAX_ROUNDS = 30  # a rule that never fires (qemu against a process that never converges) ends here


@dataclass(frozen=True)
class Round:
    """What one live round did. `pages_dirty` is the set the round copied (round 0: every present
    page); `seconds` from the start of its freeze until the destination acknowledged it."""

    index: int
    pages_dirty: int
    bytes_wire: int
    seconds: float
    memory_pages: int  # present pages of the process at this round
    send_seconds: float = 0.0  # from the first byte sent until the destination acknowledged
    freeze_ms: float = 0.0  # the round's freeze: the final round's costs about as much


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str
    # The rule stopped because what is left is small enough (not on a cap of rounds or bytes):
    # the migration converged, whatever the rounds before looked like.
    converged: bool = False


@dataclass(frozen=True)
class Limits:
    downtime_ms: float = DEFAULT_DOWNTIME_MS
    max_rounds: int | None = DEFAULT_MAX_ROUNDS


Rule = Callable[[Sequence[Round], Limits], Decision]


BANDWIDTH_MIN_BYTES = 1 << 20


def bandwidth(history: Sequence[Round]) -> float:
    """Bytes per second on the wire, measured over the last round; when that round was too small
    to measure a link (its time is all latency), over the last rounds that together sent 1 MiB."""
    sent = secs = 0.0
    for r in reversed(history):
        sent += r.bytes_wire
        secs += r.send_seconds or r.seconds
        if sent >= BANDWIDTH_MIN_BYTES:
            break
    return sent / secs if secs > 0 else 0.0


def predicted_downtime_ms(history: Sequence[Round]) -> float:
    """The final round copies about what the last round found dirty, at the measured bandwidth,
    after a freeze about as long as the last round's (QEMU counts only the transfer; here the
    freeze is a fixed part of the downtime that a small dirty set does not hide)."""
    if not history:
        return float("inf")
    bw = bandwidth(history)
    if bw <= 0:
        return float("inf")
    return history[-1].freeze_ms + history[-1].pages_dirty * PAGE / bw * 1e3


def qemu(history: Sequence[Round], limits: Limits) -> Decision:
    """QEMU: stop when the bytes still dirty fit into bandwidth x downtime limit."""
    if len(history) < 2:
        return Decision(False, "round 0 copies everything; the dirty set is known from round 1")
    pred = predicted_downtime_ms(history)
    if pred <= limits.downtime_ms:
        return Decision(
            True,
            f"qemu: {history[-1].pages_dirty} dirty pages fit the downtime limit "
            f"(predicted {pred:.1f} ms <= {limits.downtime_ms:g} ms)",
            converged=True,
        )
    # A freeze that alone takes the limit (a loaded machine) is not shortened by more rounds:
    # then the dirty set's transfer need only fit a quarter of the limit.
    freeze = history[-1].freeze_ms
    if freeze >= limits.downtime_ms * 0.75 and pred - freeze <= limits.downtime_ms / 4:
        return Decision(
            True,
            f"qemu: {history[-1].pages_dirty} dirty pages take {pred - freeze:.1f} ms to send; the "
            f"freeze ({freeze:.1f} ms) alone exceeds what is left of the {limits.downtime_ms:g} ms limit",
            converged=True,
        )
    return Decision(False, f"qemu: predicted downtime {pred:.1f} ms > {limits.downtime_ms:g} ms")


def xen(history: Sequence[Round], limits: Limits) -> Decision:
    """Xen: fewer than 50 dirty pages, or 30 rounds, or 3x the memory sent."""
    if not history:
        return Decision(False, "no round yet")
    last = history[-1]
    sent = sum(r.pages_dirty for r in history)
    if len(history) >= 2 and last.pages_dirty < 50:
        return Decision(True, f"xen: {last.pages_dirty} dirty pages < 50", converged=True)
    if len(history) >= 30:
        return Decision(True, f"xen: {len(history)} rounds (limit 30)")
    if sent >= 3 * last.memory_pages:
        return Decision(True, f"xen: {sent} pages sent >= 3x the memory ({last.memory_pages} pages)")
    return Decision(False, f"xen: {last.pages_dirty} dirty pages")


def phaul(history: Sequence[Round], limits: Limits) -> Decision:
    """P.Haul: dirty pages <= 64, or more than 10% growth over the last round, or 8 rounds."""
    if not history:
        return Decision(False, "no round yet")
    last = history[-1]
    if len(history) >= 2:
        if last.pages_dirty <= 64:
            return Decision(True, f"phaul: {last.pages_dirty} dirty pages <= 64", converged=True)
        prev = history[-2].pages_dirty
        if len(history) >= 3 and last.pages_dirty > prev * 1.1:
            return Decision(
                True, f"phaul: dirty set grew by more than 10% ({prev} -> {last.pages_dirty} pages)"
            )
    if len(history) >= 8:
        return Decision(True, f"phaul: {len(history)} rounds (limit 8)")
    return Decision(False, f"phaul: {last.pages_dirty} dirty pages")


def fixed_rounds(n: int) -> Rule:
    def rule(history: Sequence[Round], limits: Limits) -> Decision:
        if len(history) >= n:
            return Decision(True, f"rounds:{n}: {len(history)} live rounds done")
        return Decision(False, f"rounds:{n}: {len(history)} of {n} live rounds")

    return rule


def get_rule(name: str) -> Rule:
    if name == "qemu":
        return qemu
    if name == "xen":
        return xen
    if name == "phaul":
        return phaul
    if name.startswith("rounds:"):
        try:
            n = int(name.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise CkptError(f"policy {name!r}: N must be a positive number of live rounds")
        return fixed_rounds(n)
    raise CkptError(f"unknown policy {name!r} (qemu, xen, phaul or rounds:N)")


def decide(rule: Rule, history: Sequence[Round], limits: Limits) -> Decision:
    """The rule, capped by --max-rounds."""
    d = rule(history, limits)
    if not d.stop and limits.max_rounds is not None and len(history) >= limits.max_rounds:
        return Decision(
            True, f"max-rounds: {len(history)} live rounds (the rule had not stopped: {d.reason})"
        )
    return d


def dirty_rate(history: Sequence[Round], i: int = -1) -> float:
    """Pages written per second while round i-1 was copied: round i's dirty set (what was written
    from round i-1's re-arming to round i's freeze) over round i-1's duration. Not over round i's
    own, which is that set's copy at the link's speed: that quotient is the bandwidth whatever the
    process does (a throttled writer's rounds all read ~2440 pages/s over 10 MB/s). 0 for round 0,
    whose set is the whole memory."""
    i %= len(history)
    prev = history[i - 1].seconds if i else 0.0
    return history[i].pages_dirty / prev if prev > 0 else 0.0


def dirtied_share(history: Sequence[Round], i: int) -> float:
    """Bytes the process dirtied while round i-1 was sent (round i's dirty set), over the bytes
    round i-1 put on the wire."""
    sent = history[i - 1].bytes_wire
    return history[i].pages_dirty * PAGE / sent if sent > 0 else 0.0


CONVERGE_THRESHOLD = 0.5  # QEMU's throttle-trigger-threshold: 50%
SHRINK = 0.9  # a dirty set below this share of the one before is still shrinking


def shrinking(history: Sequence[Round], i: int) -> bool:
    """Round i's dirty set is clearly smaller than round i-1's."""
    return history[i].pages_dirty < SHRINK * history[i - 1].pages_dirty


def converging(history: Sequence[Round]) -> bool:
    """Not converging when, in each of the last two rounds, the process dirtied at least half as
    much as the link carried meanwhile (QEMU's test: its working set is re-sent again and again)
    *and* the dirty set did not shrink. QEMU's share alone also fires for a set that shrinks round
    over round (262k, 141k, 113k, 80k, ... pages: each round 0.55-0.8 of the one before): that
    migration converges, only more slowly than the link's speed alone would say."""
    if len(history) < 3:
        return True
    return not all(
        dirtied_share(history, i) >= CONVERGE_THRESHOLD and not shrinking(history, i) for i in (-1, -2)
    )


def throttle_due(history: Sequence[Round]) -> bool:
    """--auto-converge's next step (QEMU's trigger: throttle-trigger-threshold 50%, two rounds in a
    row): in each of the last two rounds the process dirtied at least half of what the link carried.
    Whether the set still shrinks does not count here, as it does for the warning (`converging`):
    a set shrinking by 10% a round converges too slowly for any cap of rounds (a CPU-bound writer
    over 10 MB/s: 16779 -> 975 pages in 20 rounds, throttled in 5 of them, then ended by
    --max-rounds short of the limit), and the user asked to trade the process's CPU for it."""
    if len(history) < 3:
        return False
    return all(dirtied_share(history, i) >= CONVERGE_THRESHOLD for i in (-1, -2))


def convergence_warning(history: Sequence[Round], decision: Decision, bandwidth: float) -> str | None:
    """What to say when the live rounds ended without converging; None when they converged (the
    rule stopped on what was left, or the dirty sets were still shrinking when a cap ended them)."""
    if decision.converged or converging(history):
        return None
    share = min(dirtied_share(history, i) for i in (-1, -2))
    return (
        f"did not converge: the dirty set stopped shrinking ({history[-3].pages_dirty}, "
        f"{history[-2].pages_dirty}, {history[-1].pages_dirty} pages in the last rounds) and in each "
        f"of the last two rounds the process dirtied {share:.0%} or more of what the link carried "
        f"({bandwidth / 1e6:.1f} MB/s)"
    )
