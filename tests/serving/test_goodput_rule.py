"""The goodput rule on plain data: given step costs stand in for the engine's clock."""
import random
import subprocess
import sys

import pytest

from nextserve.router.acceptance import AcceptanceTracker, SpeculativeConfig, expected_tokens
from nextserve.router.goodput import GoodputPolicy, bucket_of

MS = 1e-3


def drive(policy, rows, verify, draft, steps, start=0):
    """Run the rule as the decoder does: a step's verify phase feeds the k chosen the step before, its
    draft phase makes the k chosen now. verify(k) and draft(k) give seconds (they may read the step
    index, passed as `step=`). Returns the k chosen at each step."""
    chosen, fed = [], 0
    for step in range(start, start + steps):
        policy.observe(len(rows), "verify", fed, verify(fed, step=step))
        k = policy.choose(rows)
        policy.observe(len(rows), "draft", k, draft(k, step=step))
        chosen.append(k)
        fed = k
    return chosen


def best_by_hand(rows, verify, draft, max_k):
    return max(range(max_k + 1), key=lambda k: sum(expected_tokens(p, min(k, c)) for p, c in rows)
               / (verify(k, step=0) + draft(k, step=0)))


# a verification that costs as much per token as a decode (compute-bound: a wide batch), drafts that cost
compute_bound = dict(verify=lambda k, step: 10 * MS * (1 + k), draft=lambda k, step: 3 * MS * k)
# a verification that costs little more than a decode (overhead-bound: one sequence), cheap drafts
overhead_bound = dict(verify=lambda k, step: 10 * MS + 0.5 * MS * k, draft=lambda k, step: 1.5 * MS * k)


def test_the_rule_does_not_import_torch():
    code = "import sys, nextserve.router.goodput; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_buckets_are_half_octaves_of_the_batch_size():
    assert [bucket_of(b) for b in (1, 2, 3, 4, 5, 6, 7, 9, 10, 13, 16, 64)] == [0, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 12]
    with pytest.raises(ValueError, match="at least one sequence"):
        bucket_of(0)


def test_it_picks_no_drafts_when_they_cost_more_than_they_yield():
    rows = [(0.6, 2)] * 16
    assert best_by_hand(rows, **compute_bound, max_k=2) == 0
    policy = GoodputPolicy(2)
    chosen = drive(policy, rows, **compute_bound, steps=600)
    assert policy.buckets[bucket_of(16)].best == 0
    # its first steps measure k = 2 and k = 0; then a probe of k = 1 now and then, ever rarer
    assert chosen[:2] == [2, 0] and chosen[-100:].count(0) >= 99
    assert sum(k > 0 for k in chosen) <= 8
    # drafts that would pay 3%: inside the margin, so not worth the noise
    rows = [(0.5, 2)]
    marginal = dict(verify=lambda k, step: 10 * MS * (1 + 0.4 * k), draft=lambda k, step: 0.56 * MS * k)
    assert best_by_hand(rows, **marginal, max_k=2) == 1
    assert drive(GoodputPolicy(2), rows, **marginal, steps=200)[-100:].count(0) >= 98
    assert drive(GoodputPolicy(2, margin=0), rows, **marginal, steps=200)[-100:].count(1) >= 98


def test_it_drafts_when_drafts_pay_and_picks_the_k_that_pays_most():
    rows = [(0.9, 2)]
    assert best_by_hand(rows, **overhead_bound, max_k=2) == 2
    policy = GoodputPolicy(2)
    chosen = drive(policy, rows, **overhead_bound, steps=300)
    assert policy.buckets[bucket_of(1)].best == 2 and chosen[-100:].count(2) >= 99
    # middling acceptance against middling costs: one draft is the best
    rows = [(0.5, 2)] * 4
    middle = dict(verify=lambda k, step: 10 * MS + 1 * MS * k, draft=lambda k, step: 1 * MS * k + 2 * MS * k * k)
    assert best_by_hand(rows, **middle, max_k=2) == 1
    policy = GoodputPolicy(2)
    assert drive(policy, rows, **middle, steps=300)[-100:].count(1) >= 99


def test_a_k_it_never_measured_is_costed_on_the_line_through_its_neighbours():
    policy = GoodputPolicy(2)
    rows = [(0.5, 2)]
    drive(policy, rows, **overhead_bound, steps=3)  # measures k = 2 and k = 0
    bucket = policy.buckets[bucket_of(1)]
    assert bucket.measured(2) and bucket.measured(0) and not bucket.measured(1)
    assert bucket.estimate(1) == pytest.approx((bucket.cost(0) + bucket.cost(2)) / 2)


def test_it_adapts_when_the_costs_change_both_ways():
    rows = [(0.9, 2)] * 4
    policy = GoodputPolicy(2, probe_every=4, max_probe_every=32)
    # drafts pay for 300 steps, then verification becomes compute-bound, then cheap again
    phase = lambda step: "cheap" if step < 300 or step >= 600 else "dear"  # noqa: E731
    verify = lambda k, step: (overhead_bound if phase(step) == "cheap" else compute_bound)["verify"](k, step)  # noqa: E731
    draft = lambda k, step: (overhead_bound if phase(step) == "cheap" else compute_bound)["draft"](k, step)  # noqa: E731
    chosen = drive(policy, rows, verify, draft, steps=900)
    assert chosen[250:300].count(2) >= 46  # a probe of k = 1 every 32 steps at most
    # what changed for one k shows at the probes of its neighbours (a rise of the running k alone
    # reads as the machine's: it carries the others along): k = 1, then k = 0, within two intervals
    assert chosen[380:600].count(0) >= 205
    assert chosen[700:900].count(2) >= 190


def test_a_load_that_slows_every_k_alike_does_not_move_it_off_the_best():
    rows = [(0.9, 2)]
    load = lambda step: 1.0 if step < 200 else 3.0  # noqa: E731 (the machine gets busy)
    verify = lambda k, step: overhead_bound["verify"](k, step) * load(step)  # noqa: E731
    draft = lambda k, step: overhead_bound["draft"](k, step) * load(step)  # noqa: E731
    chosen = drive(GoodputPolicy(2), rows, verify, draft, steps=600)
    assert chosen[100:200].count(2) >= 98 and chosen[200:600].count(2) >= 390


NOISE = {
    "even": lambda rng: rng.uniform(0.7, 1.5),                                # every step off by -30%..+50%
    "spikes": lambda rng: 1 + (rng.random() < 0.2) * rng.uniform(0.5, 2.5),  # one step in five slowed 1.5-3.5x
}


@pytest.mark.parametrize("noise", list(NOISE))
def test_it_never_settles_on_a_k_that_is_slower_than_no_drafts_under_noisy_times(noise):
    rng = random.Random(0)
    noisy = lambda f: (lambda k, step: f(k, step) * NOISE[noise](rng))  # noqa: E731
    for costs, rows in ((compute_bound, [(0.6, 2)] * 16), (overhead_bound, [(0.9, 2)])):
        policy = GoodputPolicy(2)
        chosen = drive(policy, rows, noisy(costs["verify"]), noisy(costs["draft"]), steps=2000)
        best = best_by_hand(rows, **costs, max_k=2)
        assert sum(k == best for k in chosen[200:]) >= 0.9 * 1800
        yields = [sum(expected_tokens(p, min(k, c)) for p, c in rows) / (costs["verify"](k, step=0) + costs["draft"](k, step=0))
                  for k in range(3)]
        assert sum(yields[k] for k in chosen[200:]) / 1800 >= 0.97 * yields[best]  # goodput, of the best


def test_a_batch_size_never_seen_starts_from_its_nearest_known_neighbour():
    policy = GoodputPolicy(2)
    drive(policy, [(0.6, 2)] * 16, **compute_bound, steps=50)
    assert policy.buckets[bucket_of(16)].best == 0
    # eleven sequences: no step with k = 2 to learn that drafts do not pay there either
    assert drive(policy, [(0.6, 2)] * 11, **compute_bound, steps=20)[:7] == [0] * 7  # (a probe at 8)
    policy = GoodputPolicy(2)
    drive(policy, [(0.9, 2)], **overhead_bound, steps=50)
    assert drive(policy, [(0.9, 2)] * 2, **overhead_bound, steps=20)[:7] == [2] * 7


def test_draft_ceilings_bound_k_and_rows_that_never_draft_still_count():
    policy = GoodputPolicy(3)
    assert policy.choose([(0.9, 0), (0.9, 0)]) == 0  # nobody may draft: nothing to decide, nothing counted
    assert bucket_of(2) not in policy.buckets
    chosen = drive(policy, [(0.95, 1), (0.5, 0)], **overhead_bound, steps=50)
    assert max(chosen) == 1 and chosen[-10:] == [1] * 10
    assert set(policy.buckets) == {bucket_of(2)}


def test_a_short_acceptance_record_is_taken_optimistically():
    t = AcceptanceTracker(SpeculativeConfig(2))
    t.record(2, 0)  # a bad first draft
    assert t.optimistic_rate > t.rate + 0.2
    for _ in range(200):
        t.record(2, 1)
    assert t.optimistic_rate - t.rate < 0.05


@pytest.mark.parametrize("make,message", [
    (lambda: GoodputPolicy(0), "K >= 1"),
    (lambda: GoodputPolicy(2, alpha=0), "EWMA"),
    (lambda: GoodputPolicy(2, probe_every=8, max_probe_every=4), "probe_every"),
    (lambda: GoodputPolicy(2, margin=1.0), "margin"),
    (lambda: GoodputPolicy(2).observe(1, "prefill", 0, 1.0), "phase"),
    (lambda: GoodputPolicy(2).observe(1, "verify", 3, 1.0), "k must be in 0..2"),
])
def test_bad_settings_and_observations_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
