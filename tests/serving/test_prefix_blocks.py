"""The prefix cache's block accounting on plain data (no torch): shared and cached blocks never make the
books wrong, eviction takes only unreferenced blocks, least recently used first, and preemption works
with shared blocks."""
import random
import subprocess
import sys

from nextserve.router.cache.keys import CacheNamespace
from nextserve.router.prefix_cache import CachingBlockManager
from nextserve.router.requests import StopCriteria
from nextserve.router.scheduler import Scheduler, Sequence

NS = CacheNamespace("cd" * 8, "bfloat16")


def manager(num_blocks=8, num_slots=4, max_snapshots=4) -> CachingBlockManager:
    return CachingBlockManager(num_blocks, num_slots, NS, max_snapshots, snapshot_interval=1024)


def hold(m: CachingBlockManager, seq_id: int, tokens: list[int]) -> None:
    """Admit a sequence holding `tokens` (resuming a cached prefix if any) and register a snapshot at its end."""
    keys = m.keys(tokens)
    m.admit(seq_id, len(tokens), m.lookup(keys, tokens))
    m.register(seq_id, keys)
    m.check()


def test_the_scheduler_and_the_prefix_cache_import_no_torch():
    code = "import sys, nextserve.router.prefix_cache, nextserve.router.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_freed_blocks_stay_cached_and_a_shared_prefix_takes_references():
    m = manager()
    prompt = list(range(130))
    hold(m, 1, prompt)                     # 3 blocks: two full and a 2-token tail
    m.release(1)
    assert m.num_cached_blocks == 3 and m.num_free_blocks == 8
    keys = m.keys(prompt[:100] + [7] * 50)
    hit = m.lookup(keys, prompt[:100] + [7] * 50)
    assert hit is None                      # a snapshot only at 130: the blocks alone are no hit
    hit = m.lookup(m.keys(prompt), prompt)
    assert hit.position == 130 and len(hit.shared_blocks) == 2 and hit.partial is not None
    m.admit(2, 140, hit)
    m.admit(3, 140, m.lookup(m.keys(prompt), prompt))
    shared = m.table(2)[:2]
    assert m.table(3)[:2] == shared and all(m._ref_counts[b] == 2 for b in shared)
    assert m.table(2)[2] != m.table(3)[2]   # the partial tail is copied, never shared
    assert [(c.src, c.rows) for c in m.take_copies()] == [(hit.partial[0], 2)] * 2
    m.check()


def test_eviction_takes_the_least_recently_used_unreferenced_blocks_only():
    m = manager(num_blocks=3, num_slots=4)
    hold(m, 1, list(range(64)))
    hold(m, 2, list(range(100, 164)))
    m.release(1)
    m.release(2)
    hold(m, 3, list(range(200, 264)))      # a free block is taken before any cached one
    assert m.num_cached_blocks == 3
    m.admit(4, 64)                           # no keyless block left: evicts sequence 1's, the oldest
    assert m.lookup(m.keys(list(range(64))), list(range(64))) is None
    assert m.lookup(m.keys(list(range(100, 164))), list(range(100, 164))).position == 64
    assert not m.can_admit(128)              # 1 cached unreferenced block left: 3's is held
    m.check()


def test_snapshots_are_bounded_and_evicted_ones_are_handed_to_the_runner():
    m = manager(num_blocks=16, max_snapshots=2)
    for i in range(3):
        hold(m, i, [i] * 10)
        m.release(i)
    assert m.num_snapshots == 2 and len(m.take_dropped()) == 1
    assert m.lookup(m.keys([0] * 10), [0] * 10) is None
    assert m.lookup(m.keys([2] * 10), [2] * 10).position == 10


def test_two_tails_of_the_same_length_under_the_same_parent_are_both_found():
    m = manager(num_blocks=4, num_slots=8)
    hold(m, 1, [1] * 39)
    hold(m, 2, [2] * 39)
    for seq in (1, 2):
        m.release(seq)
    assert m.lookup(m.keys([1] * 39 + [5] * 9), [1] * 39 + [5] * 9).position == 39
    assert m.lookup(m.keys([2] * 39 + [5] * 9), [2] * 39 + [5] * 9).position == 39
    for i in range(3, 7):                    # take every block: both tails are evicted
        m.admit(i, 64)
    m.check()
    assert m.lookup(m.keys([1] * 39), [1] * 39) is None


def test_random_workloads_keep_the_books_balanced():
    rng = random.Random(0)
    for _ in range(20):
        m = manager(num_blocks=rng.randint(4, 12), num_slots=3, max_snapshots=rng.randint(1, 5))
        held: list[int] = []
        for seq_id in range(60):
            if held and (len(held) == 3 or rng.random() < 0.5):
                m.release(held.pop(rng.randrange(len(held))))
            prefix = rng.choice([[1] * 64, [2] * 30, [1] * 64 + [3] * 64])
            tokens = prefix + [rng.randrange(5) for _ in range(rng.randint(0, 70))]
            keys = m.keys(tokens)
            hit = m.lookup(keys, tokens)
            if hit is not None:
                assert hit.position <= len(tokens)
            if len(held) < 3 and m.can_admit(len(tokens), hit):
                m.admit(seq_id, len(tokens), hit)
                m.take_copies()
                m.register(seq_id, keys)
                held.append(seq_id)
            m.check()
            assert sum(m._ref_counts) == sum(len(m.table(s)) for s in held)


def test_preemption_with_shared_blocks_finishes_every_sequence():
    m = manager(num_blocks=5, num_slots=3, max_snapshots=6)
    scheduler = Scheduler(max_batch_tokens=64, max_running=3, max_queue=8, blocks=m)
    prefix = list(range(64))
    seqs = [Sequence(i, prefix + [100 + i] * 5, StopCriteria(70, 10**6, ignore_eos=True)) for i in range(3)]
    scheduler.add(seqs[0])
    steps = 0
    while scheduler.has_work():
        if steps == 3:
            for s in seqs[1:]:
                scheduler.add(s)
        batch = scheduler.schedule()
        steps += 1
        sampled = {s.seq_id: 7 for s, want in zip(batch.seqs, batch.samples()) if want}
        scheduler.postprocess(batch, sampled)
        m.check()
    assert scheduler.num_preemptions > 0
    assert all(len(s.output_ids) == 70 and s.finish_reason == "length" for s in seqs)
    assert seqs[1].num_cached == 64 and seqs[2].num_cached == 64
