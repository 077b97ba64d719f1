"""The block manager on plain data: it never hands out more than it has, and its books always balance."""
import random

import pytest

from nextserve.router.block_manager import BlockManager, OutOfBlocks, blocks_for


def test_blocks_for_rounds_up_to_whole_blocks():
    assert [blocks_for(n, 64) for n in (0, 1, 63, 64, 65, 128, 129)] == [0, 1, 1, 1, 2, 2, 3]


def test_admit_grow_release_keep_tables_slots_and_counts():
    m = BlockManager(num_blocks=4, num_slots=2, block_size=4)
    m.admit(1, 5)                          # 2 blocks
    assert len(m.table(1)) == 2 and m.num_free_blocks == 2 and m.num_free_slots == 1
    m.grow(1, 8)                           # still 2 blocks: 8 tokens fit
    assert len(m.table(1)) == 2
    m.grow(1, 9)
    assert len(m.table(1)) == 3 and m.num_free_blocks == 1
    m.admit(2, 1)
    assert m.slot(1) != m.slot(2) and m.num_free_slots == 0 and m.num_free_blocks == 0
    assert not m.can_admit(1) and not m.can_grow(2, 5)
    m.check()
    m.release(1)
    m.release(1)                           # idempotent
    assert m.num_free_blocks == 3 and m.num_free_slots == 1 and not m.holds(1)
    m.check()


def test_over_asking_raises_instead_of_handing_out_memory_it_lacks():
    m = BlockManager(num_blocks=2, num_slots=1, block_size=4)
    with pytest.raises(OutOfBlocks):
        m.admit(1, 9)
    assert m.num_free_blocks == 2 and m.num_free_slots == 1  # nothing taken by the failed call
    m.admit(1, 4)
    with pytest.raises(OutOfBlocks):
        m.admit(2, 1)                      # no slot left
    with pytest.raises(OutOfBlocks):
        m.grow(1, 13)
    with pytest.raises(ValueError):
        m.admit(1, 1)                      # already admitted
    m.check()


def test_random_traffic_never_exceeds_the_pool():
    rng = random.Random(0)
    m = BlockManager(num_blocks=10, num_slots=3, block_size=4)
    lengths: dict[int, int] = {}
    for step in range(2000):
        op = rng.random()
        if op < 0.3 and m.can_admit(n := rng.randint(1, 20)):
            m.admit(step, n)
            lengths[step] = n
        elif op < 0.8 and lengths:
            seq = rng.choice(list(lengths))
            n = lengths[seq] + rng.randint(1, 6)
            if m.can_grow(seq, n):
                m.grow(seq, n)
                lengths[seq] = n
        elif lengths:
            seq = rng.choice(list(lengths))
            m.release(seq)
            del lengths[seq]
        m.check()
        used = sum(len(m.table(s)) for s in lengths)
        assert used + m.num_free_blocks == 10 and len(lengths) + m.num_free_slots == 3
        assert all(len(m.table(s)) == blocks_for(n, 4) for s, n in lengths.items())
