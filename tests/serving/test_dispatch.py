"""The host-side split of a layer's tokens: every slot to exactly one worker, replicas sharing a shard."""
import pytest
import torch

from nextserve.router.dispatch import Routing, add_partials, split_tokens, to_host, unowned_experts

# 6 experts; shard 0 holds 0-2 with replicas (connections 0, 1), shard 1 holds 3-5 (connection 2)
TWO_SHARDS = Routing(owner=torch.tensor([0, 0, 0, 1, 1, 1]), replicas={0: (0, 1), 1: (2,)})


def random_ids(T, k=3, E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(E, generator=g)[:k] for _ in range(T)]
    return torch.stack(rows).to(torch.int32) if rows else torch.empty(0, k, dtype=torch.int32)


def coverage(parts, T, k):
    """[T, k]: how many parts compute each slot."""
    count = torch.zeros(T, k, dtype=torch.int64)
    for p in parts:
        count[p.rows] += (p.expert_ids >= 0).long()
    return count


@pytest.mark.parametrize("T", [0, 1, 2, 7, 33])
def test_every_slot_goes_to_exactly_one_worker_of_its_owner_shard(T):
    ids = random_ids(T, seed=T)
    parts = split_tokens(TWO_SHARDS, ids)
    assert torch.equal(coverage(parts, T, 3), torch.ones(T, 3, dtype=torch.int64))
    for p in parts:
        computed = p.expert_ids[p.expert_ids >= 0].long()
        assert bool((TWO_SHARDS.owner[computed] == p.shard).all())
        assert p.connection in TWO_SHARDS.replicas[p.shard]
        assert bool((p.expert_ids >= 0).any(dim=1).all())  # no row is sent with nothing to do
        assert torch.equal(p.expert_ids[p.expert_ids >= 0], ids[p.rows][p.expert_ids >= 0])
    assert [p.shard for p in parts] == sorted(p.shard for p in parts)


def test_replicas_of_a_shard_take_contiguous_halves_and_the_first_half_rotates():
    ids = torch.tensor([[0, 3, 4]] * 9, dtype=torch.int32)  # every token needs both shards
    first, second = split_tokens(TWO_SHARDS, ids, turn=0), split_tokens(TWO_SHARDS, ids, turn=1)
    shard0 = [(p.connection, p.rows.tolist()) for p in first if p.shard == 0]
    assert shard0 == [(0, [0, 1, 2, 3, 4]), (1, [5, 6, 7, 8])]
    shard0_next_turn = [(p.connection, p.rows.tolist()) for p in second if p.shard == 0]
    assert shard0_next_turn == [(1, [0, 1, 2, 3, 4]), (0, [5, 6, 7, 8])]
    assert [p.connection for p in first if p.shard == 1] == [2]
    # a single decoding token alternates between the replicas
    one = torch.tensor([[1, 2, 5]], dtype=torch.int32)
    assert [[p.connection for p in split_tokens(TWO_SHARDS, one, turn) if p.shard == 0] for turn in range(4)] == \
        [[0], [1], [0], [1]]


def test_a_replicated_expert_goes_to_the_first_shard_holding_it_and_skipped_slots_stay_skipped():
    # expert 2 is held by shards 0 and 1; shard 0 is down, so shard 1 owns it
    routing = Routing(owner=torch.tensor([-1, -1, 1, 1]), replicas={1: (3,)})
    ids = torch.tensor([[2, 3, -1], [3, -1, -1]], dtype=torch.int32)
    (part,) = split_tokens(routing, ids)
    assert part.shard == 1 and part.rows.tolist() == [0, 1] and torch.equal(part.expert_ids, ids)
    assert unowned_experts(routing, ids) == []
    assert unowned_experts(routing, torch.tensor([[0, 2, 1]], dtype=torch.int32)) == [0, 1]
    with pytest.raises(ValueError, match=r"experts without a healthy holder: \[0\]"):
        split_tokens(routing, torch.tensor([[0, 2, 3]], dtype=torch.int32))


@pytest.mark.parametrize("T", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_host_brings_all_three_tensors_back_bit_for_bit(dtype, T):
    H, k = 12, 3
    hidden = torch.randn(T, H).to(dtype)
    ids, weights = random_ids(T).long(), torch.rand(T, k)
    got_hidden, got_ids, got_weights = to_host(hidden, ids, weights)
    assert got_hidden.dtype == dtype and torch.equal(got_hidden, hidden)
    assert got_ids.dtype == torch.int32 and torch.equal(got_ids, ids.int())
    assert got_weights.dtype == torch.float32 and torch.equal(got_weights, weights)


def test_partials_are_added_in_shard_order_whatever_order_they_arrive_in():
    T, H = 2, 4
    three = Routing(owner=torch.tensor([0, 1, 2]), replicas={0: (0,), 1: (1,), 2: (2,)})
    parts = split_tokens(three, torch.tensor([[0, 1, 2]] * T, dtype=torch.int32))
    # fp32: (1e8 + 1) - 1e8 == 0 in shard order, but (1e8 - 1e8) + 1 == 1 in the arrival order below
    values = {0: 1e8, 1: 1.0, 2: -1e8}
    partials = {p.shard: (p, torch.full((T, H), values[p.shard])) for p in parts}
    arrived = [partials[0], partials[2], partials[1]]
    assert torch.equal(add_partials(T, H, arrived), torch.zeros(T, H))
