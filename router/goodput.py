"""How many drafts the next speculative step makes: the k with the most accepted tokens per second.

Plain data, no torch (the scheduler side of speculative decoding). A step's cost is what the engine
measured, not a constant: verifying k drafts for each of b sequences feeds b * (k + 1) tokens, which
costs little more than a decode of b tokens while the step is bound by per-pass overhead (small b)
and up to k + 1 times more once it is bound by compute (wide b); drafting them runs the MTP head k
times. So, as SmartSpec and vLLM's dynamic speculation reason, the rule is goodput:

- the engine times each step's two phases, verification (the forward pass over the pending tokens
  and their drafts, acceptance, rollback) and drafting (the MTP head), and keeps an EWMA of each per
  (batch bucket, k), forgetting per step of the bucket (so a k probed rarely is judged by its last
  probes, not by what it cost long ago) and clipping a sample far above its recent least (noise on a
  shared machine only ever slows a step); a k other than the one being run is carried to now by
  how much the running k's cost moved since it was last measured (a busier machine or longer contexts
  move every k's cost alike; a noisy spike in the running k then moves the others with it, rather
  than making them look cheap): buckets are half octaves of the batch size (1, 2, 3, 4, 5-6, 7-9, 10-13, ...),
  since what drives a step's cost is its token count, b * (k + 1) with k fixed per bucket entry;
  only steps in which every sequence decodes are timed (a prompt chunk would dwarf the difference);
- a step with k drafts costs verify(b, k) + draft(b, k) and yields sum_i E_i(k) tokens,
  E_i(k) = 1 + p_i + ... + p_i^k for sequence i's running acceptance p_i (its draft ceiling caps k);
  the step drafts the k in 0..K with the largest yield / cost, where a k > 0 must beat no drafts by
  `margin` (5%): a gain smaller than the noise in the times and the steps spent probing is none;
- one k for the whole batch: a step runs the chained MTP passes as many times as its largest k and
  one verification pass whatever each row feeds, so the cost is a function of (b, k) that a handful
  of probes learns, where a k per sequence would need the cost of every mix of ks;
- exploration: the engine's first bucket measures the largest k its rows allow and k = 0, a step
  each; a bucket seen later starts from the estimates of the nearest bucket that has them, carried
  by what the k it runs costs in it (see `BucketCosts.seed`), and explores by probes only; a k
  not measured yet is costed by the line through its nearest measured neighbours (interpolated
  between them, extrapolated past the largest), and tried when that makes it look best. Then every so often (every `probe_every` steps of the bucket, doubling
  after each probe up to `max_probe_every`, back to `probe_every` when the best k changes) one step
  runs a neighbour of the best k, the one measured longest ago: a cost that changed (a busier
  machine, longer contexts) is seen again, at the price of a step one k away from the best. Between
  probes the best k is the only one run: the rule never stays on a k that measures slower per token
  than k = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from .acceptance import expected_tokens

PHASES = ("verify", "draft")
LONG_AGO = 10**9  # bucket steps: a copied estimate counts as that old


def bucket_of(num_rows: int) -> int:
    """Half-octave bucket of a batch size: 1 -> 0, 2 -> 2, 3 -> 3, 4 -> 4, 5-6 -> 5, 7-9 -> 6, 10-13 -> 7, ..."""
    if num_rows < 1:
        raise ValueError(f"a step has at least one sequence, got {num_rows}")
    return round(2 * math.log2(num_rows))


@dataclass(slots=True)
class Ewma:
    """A mean that forgets at `alpha` per step of its bucket, whether or not it was sampled in it: the
    k run every step averages its recent steps, and a k probed now and then is mostly its last probe
    (what it cost long ago says little of now). Its first samples are averaged plainly. A sample more
    than `CLIP` times the least of its last `WINDOW` samples (of the last 2 * WINDOW steps) counts as
    that much: noise on a shared machine only ever slows a step, so a step slowed by something else
    moves the mean little, while a lasting rise passes within `WINDOW` samples."""
    alpha: float
    value: float | None = None
    samples: int = 0
    last: int = -1  # the bucket step at which it was last updated
    recent: list[float] = field(default_factory=list)

    WINDOW: ClassVar[int] = 4
    CLIP: ClassVar[float] = 1.25

    def add(self, x: float, step: int) -> None:
        self.samples += 1
        # the window holds recent samples only: a k probed now and then is not clipped by old probes
        kept = self.recent[1 - self.WINDOW:] if step - self.last <= 2 * self.WINDOW else []
        self.recent = kept + [x]
        x = min(x, self.CLIP * min(self.recent))
        forget = 1 - (1 - self.alpha) ** max(1, step - self.last)
        weight = max(forget, 1 / self.samples)
        self.value = x if self.value is None else self.value + weight * (x - self.value)
        self.last = step


@dataclass
class BucketCosts:
    """Measured seconds per phase and k for one batch bucket, and when it probes next."""
    max_k: int
    alpha: float
    probe_every: int
    phases: dict[str, list[Ewma]] = field(init=False)
    steps: int = 0            # decisions taken for this bucket
    next_probe: int = 0       # the decision at which the next probe runs
    interval: int = 0         # steps between probes now
    best: int | None = None   # the k exploitation chose last
    # k -> (a reference k, its cost then, a factor): k's cost now is its own times the factor times how
    # much the reference's cost moved since; the reference is the best k of the time
    anchors: dict[int, tuple[int, float, float]] = field(default_factory=dict)

    def __post_init__(self):
        self.phases = {p: [Ewma(self.alpha) for _ in range(self.max_k + 1)] for p in PHASES}
        self.interval = self.probe_every
        self.next_probe = self.probe_every

    def add(self, phase: str, k: int, seconds: float) -> None:
        self.phases[phase][k].add(seconds, self.steps)
        if k != self.best and self.best is not None and self.measured(self.best):
            self.anchors[k] = (self.best, self.own(self.best), 1.0)

    def seed(self, other: "BucketCosts") -> None:
        """Start from a neighbouring bucket's estimates, as if measured long ago: the first sample of a
        kind here all but replaces its copy, and the k that runs carries the others along (anchors), so
        the costs of a batch of 11 start as those of 16 scaled by what the k it runs costs at 11."""
        for phase in PHASES:
            for mine, theirs in zip(self.phases[phase], other.phases[phase]):
                if theirs.value is not None:
                    mine.value, mine.samples, mine.last = theirs.value, 1, -LONG_AGO
        self.best, self.anchors = other.best, dict(other.anchors)
        self.rebase(other.best)

    def rebase(self, best: int) -> None:
        """`best` becomes the k that runs: every other k is carried from now on by how `best` moves."""
        for k in range(self.max_k + 1):
            if k != best and self.measured(k) and self.measured(best):
                self.anchors[k] = (best, self.own(best), self.cost(k) / self.own(k))
        self.best = best

    def own(self, k: int) -> float:
        return sum(self.phases[p][k].value for p in PHASES)

    def measured(self, k: int) -> bool:
        return all(self.phases[p][k].value is not None for p in PHASES)

    def cost(self, k: int) -> float:
        """k's measured seconds, carried to now: a k other than the best was measured a while ago, and
        what moved the best k's cost since (a busier machine, longer contexts) moved it alike."""
        anchor = self.anchors.get(k)
        if k == self.best or anchor is None or anchor[0] != self.best:
            return self.own(k)
        reference, then, factor = anchor
        return self.own(k) * factor * self.own(reference) / then

    def last_seen(self, k: int) -> int:
        return min(self.phases[p][k].last for p in PHASES)

    def estimate(self, k: int) -> float:
        """Seconds of a step with k drafts: measured, else on the line through the nearest measured ks
        (one on each side, or the two below it past the largest measured: 0 and some k > 0 always are)."""
        if self.measured(k):
            return self.cost(k)
        below = [j for j in range(k) if self.measured(j)]
        above = [j for j in range(k + 1, self.max_k + 1) if self.measured(j)]
        lo, hi = (below[-1], above[0]) if above else (below[-2], below[-1])
        return self.cost(lo) + (self.cost(hi) - self.cost(lo)) * (k - lo) / (hi - lo)


class GoodputPolicy:
    """The k each speculative step drafts, from the engine's own step times and the rows' acceptance."""

    def __init__(self, max_k: int, alpha: float = 0.25, probe_every: int = 8, max_probe_every: int = 256,
                 margin: float = 0.05):
        if max_k < 1:
            raise ValueError(f"the goodput rule chooses among 0..K drafts with K >= 1, got K={max_k}")
        if not 0 < alpha <= 1:
            raise ValueError(f"the EWMA weight must be in (0, 1], got {alpha}")
        if not 1 <= probe_every <= max_probe_every:
            raise ValueError(f"need 1 <= probe_every <= max_probe_every, got {probe_every}, {max_probe_every}")
        if not 0 <= margin < 1:
            raise ValueError(f"the margin drafts must win by must be in [0, 1), got {margin}")
        self.max_k, self.alpha, self.margin = max_k, alpha, margin
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self.buckets: dict[int, BucketCosts] = {}

    def _bucket(self, num_rows: int) -> BucketCosts:
        b = bucket_of(num_rows)
        if b not in self.buckets:
            bucket = BucketCosts(self.max_k, self.alpha, self.probe_every)
            # a batch size never seen starts from the nearest one that knows its costs (the larger on a
            # tie), rather than exploring again: batches shrink and grow by a few sequences at a time
            known = [c for c, costs in self.buckets.items() if costs.best is not None and costs.measured(costs.best)]
            if known:
                bucket.seed(self.buckets[min(known, key=lambda c: (abs(c - b), -c))])
            self.buckets[b] = bucket
        return self.buckets[b]

    def observe(self, num_rows: int, phase: str, k: int, seconds: float) -> None:
        """A timed phase ("verify" or "draft") of a step in which `num_rows` sequences decoded with k drafts."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if not 0 <= k <= self.max_k:
            raise ValueError(f"k must be in 0..{self.max_k}, got {k}")
        self._bucket(num_rows).add(phase, k, seconds)

    def goodput(self, rows: list[tuple[float, int]], k: int) -> float:
        """Expected tokens per second of a step with k drafts for these rows (see `choose`), from the
        bucket's measured costs (0 and its largest k must be measured)."""
        return sum(expected_tokens(p, min(k, cap)) for p, cap in rows) / self._bucket(len(rows)).estimate(k)

    def choose(self, rows: list[tuple[float, int]]) -> int:
        """The k for the next step of these rows: (acceptance rate, draft ceiling) per decoding sequence
        (ceiling 0: it never drafts, but it is in the step and in its cost)."""
        top = min(self.max_k, max((cap for _, cap in rows), default=0))
        if top == 0:
            return 0
        bucket = self._bucket(len(rows))
        bucket.steps += 1
        for k in (top, 0):  # a bucket's first steps
            if not bucket.measured(k):
                return k
        best = max(range(top + 1), key=lambda k: (self.goodput(rows, k), -k))
        if best and self.goodput(rows, best) < (1 + self.margin) * self.goodput(rows, 0):
            best = 0  # a gain inside the noise of the times, and of what learning it cost, is no gain
        if best != bucket.best:
            bucket.rebase(best)
            bucket.interval = self.probe_every
            bucket.next_probe = bucket.steps + bucket.interval
        if not bucket.measured(best):
            return best  # a k that only looks best on the line through its neighbours: measure it
        if bucket.steps >= bucket.next_probe:
            bucket.interval = min(2 * bucket.interval, self.max_probe_every)
            bucket.next_probe = bucket.steps + bucket.interval
            neighbours = [k for k in (best - 1, best + 1) if 0 <= k <= top]
            return min(neighbours, key=lambda k: (bucket.last_seen(k), k))
        return best
