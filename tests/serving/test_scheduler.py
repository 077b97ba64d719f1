"""The scheduler on plain data: no torch, no model, no network."""
import sys

import pytest

from nextserve.router.block_manager import BlockManager
from nextserve.router.scheduler import QueueFull, RequestTooLarge, ScheduledBatch, Scheduler, Sequence, Status, StopCriteria
from nextserve.router.stop_strings import StopStringMatcher

STOP = StopCriteria(max_tokens=4, context_limit=100, eos_token_id=0)


def seq(seq_id, prompt_len, stop=STOP):
    return Sequence(seq_id, list(range(10, 10 + prompt_len)), stop)


def scheduler(max_batch_tokens, max_running, max_queue, num_blocks=64, num_slots=8):
    return Scheduler(max_batch_tokens, max_running, max_queue, BlockManager(num_blocks, num_slots))


def plan_of(batch: ScheduledBatch):
    return [(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]


def test_scheduler_module_does_not_import_torch():
    import subprocess
    code = "import sys, nextserve.router.scheduler, nextserve.router.block_manager; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_prompt_is_chunked_under_the_token_budget_and_samples_only_at_its_end():
    s = scheduler(max_batch_tokens=4, max_running=8, max_queue=8)
    a = seq(1, 10)
    s.add(a)
    expected_chunks = [4, 4, 2]
    for i, n in enumerate(expected_chunks):
        batch = s.schedule()
        assert plan_of(batch) == [(1, n)]
        assert a.token_slice(n) == a.prompt_ids[a.num_computed:a.num_computed + n]
        last = i == len(expected_chunks) - 1
        assert batch.samples() == [last]
        s.postprocess(batch, {1: 7} if last else {})
    assert a.output_ids == [7] and a.num_computed == 10 and not a.is_prefilling
    batch = s.schedule()
    assert plan_of(batch) == [(1, 1)] and a.token_slice(1) == [7] and batch.samples() == [True]


def test_new_requests_join_a_running_batch_and_decodes_go_first():
    s = scheduler(max_batch_tokens=5, max_running=8, max_queue=8)
    a, b = seq(1, 3), seq(2, 6)
    s.add(a)
    s.postprocess(s.schedule(), {1: 7})          # a prefilled, sampled its first token
    s.add(b)
    batch = s.schedule()
    assert plan_of(batch) == [(1, 1), (2, 4)]    # a decodes, b's prompt takes the rest of the budget
    assert batch.samples() == [True, False]
    s.postprocess(batch, {1: 8})
    batch = s.schedule()
    assert plan_of(batch) == [(1, 1), (2, 2)] and batch.samples() == [True, True]


def test_running_limit_keeps_requests_waiting_and_the_queue_is_bounded():
    s = scheduler(max_batch_tokens=100, max_running=1, max_queue=2)
    s.add(seq(1, 2))
    s.add(seq(2, 2))
    with pytest.raises(QueueFull):
        s.add(seq(3, 2))
    batch = s.schedule()
    assert plan_of(batch) == [(1, 2)]
    assert [x.seq_id for x in s.waiting] == [2]
    s.add(seq(3, 2))  # room again: one left the queue


def test_finish_reasons_eos_stop_token_length_and_ignore_eos():
    assert STOP.finish_reason(0, 1, 5) == "stop"
    assert StopCriteria(4, 100, frozenset({9}), 0).finish_reason(9, 1, 5) == "stop"
    assert StopCriteria(4, 100, eos_token_id=0, ignore_eos=True).finish_reason(0, 1, 5) is None
    assert STOP.finish_reason(3, 4, 8) == "length"
    assert STOP.finish_reason(3, 1, 100) == "length"  # context limit
    assert STOP.finish_reason(3, 3, 8) is None


def test_finished_and_aborted_sequences_leave_the_batch():
    s = scheduler(max_batch_tokens=100, max_running=8, max_queue=8)
    a, b = seq(1, 2), seq(2, 2)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.finish(b, "abort")  # the client went away while the pass ran
    finished = s.postprocess(batch, {1: 0, 2: 5})  # a samples eos
    assert finished == [a] and a.finish_reason == "stop" and a.status is Status.FINISHED
    assert b.output_ids == [] and b.finish_reason == "abort"
    assert not s.has_work() and s.schedule() is None


def test_stop_strings_hold_back_partial_matches_and_cut_before_the_match():
    m = StopStringMatcher(["END", "\n\n"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D and more") == ("", True)
    m = StopStringMatcher(["END"])
    assert m.feed("ab E") == ("ab ", False)
    assert m.feed("x") == ("Ex", False)
    assert m.feed("tail E", final=True) == ("tail E", False)
    assert StopStringMatcher([]).feed("anything") == ("anything", False)


# -- memory: admission, preemption, rejection ------------------------------------------------------

def small(max_batch_tokens=100, max_running=8, num_blocks=4, num_slots=4, block_size=4):
    return Scheduler(max_batch_tokens, max_running, 16, BlockManager(num_blocks, num_slots, block_size))


def test_a_request_that_can_never_fit_is_rejected_at_submit_and_names_its_size():
    s = small()  # 4 blocks x 4 tokens = 16 tokens in all
    with pytest.raises(RequestTooLarge, match=r"17 tokens .* holds 16 tokens"):
        s.add(Sequence(1, list(range(10)), StopCriteria(max_tokens=8, context_limit=100)))
    s.add(Sequence(2, list(range(10)), StopCriteria(max_tokens=7, context_limit=100)))  # 16 fed tokens fit
    assert [q.seq_id for q in s.waiting] == [2]


def test_admission_waits_for_blocks_and_slots_in_arrival_order():
    s = small(num_blocks=4, num_slots=2)
    a, b, c = seq(1, 9), seq(2, 4), seq(3, 1)  # a: 3 blocks; b: 1 block; c needs a slot
    for x in (a, b, c):
        s.add(x)
    batch = s.schedule()
    assert plan_of(batch) == [(1, 9), (2, 4)] and [q.seq_id for q in s.waiting] == [3]  # slots: 2
    s.blocks.check()
    s.postprocess(batch, {1: 5, 2: 0})        # b finishes (eos): its slot and block come back
    batch = s.schedule()
    assert plan_of(batch) == [(1, 1), (3, 1)]
    s.blocks.check()


def test_decode_out_of_blocks_preempts_the_newest_and_it_recomputes_prompt_and_output():
    s = small(num_blocks=3, num_slots=4)
    a, b = seq(1, 4, StopCriteria(8, 100)), seq(2, 4, StopCriteria(8, 100))
    s.add(a)
    s.add(b)
    s.postprocess(s.schedule(), {1: 50, 2: 60})   # each holds 1 full block; 1 block free
    batch = s.schedule()                           # a takes the free block for token 5; b cannot grow
    assert plan_of(batch) == [(1, 1)]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert s.waiting[0] is b and not s.blocks.holds(2)
    s.blocks.check()
    s.postprocess(batch, {1: 51})
    s.finish(a, "abort")
    batch = s.schedule()                           # b comes back: prompt + its output so far, then samples
    assert plan_of(batch) == [(2, 5)] and b.token_slice(5) == [10, 11, 12, 13, 60] and batch.samples() == [True]


def test_a_decode_that_is_the_newest_preempts_itself_and_older_ones_go_on():
    s = small(num_blocks=3, num_slots=4)
    a, b = seq(1, 5, StopCriteria(8, 100)), seq(2, 4, StopCriteria(8, 100))
    s.add(a)
    s.add(b)
    s.postprocess(s.schedule(), {1: 50, 2: 60})   # a: 2 blocks (room for 3 more), b: 1 full block
    batch = s.schedule()                           # b needs a block, none is free, b is the newest
    assert plan_of(batch) == [(1, 1)] and b.status is Status.WAITING and b.num_preemptions == 1
    assert s.blocks.num_free_blocks == 1
    s.blocks.check()


def test_prompt_chunks_hold_their_blocks_from_admission_and_end_on_block_boundaries():
    s = small(max_batch_tokens=6, num_blocks=5, num_slots=4)
    a = seq(1, 14)
    s.add(a)
    batch = s.schedule()
    assert plan_of(batch) == [(1, 4)] and len(s.blocks.table(1)) == 4   # all 14 prompt tokens' blocks
    for n in (4, 6):  # 6 tokens of budget, cut at the block boundaries 4 and 8; the rest fits whole
        s.postprocess(batch, {})
        batch = s.schedule()
        assert plan_of(batch) == [(1, n)]


class Oracle:
    """A stand-in model on plain data: its next token depends on every token it was fed, so a
    recompute that fed anything else (or in another order) would change the output."""

    def __init__(self):
        self.fed: dict[int, list[int]] = {}

    def step(self, batch: ScheduledBatch) -> dict[int, int]:
        out = {}
        for s, n, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples()):
            if s.num_computed == 0:
                self.fed[s.seq_id] = []  # a fresh state slot
            assert len(self.fed[s.seq_id]) == s.num_computed
            self.fed[s.seq_id] += s.token_slice(n)
            if samples:
                out[s.seq_id] = (sum((i + 1) * t for i, t in enumerate(self.fed[s.seq_id])) * 7919) % 1000 + 1
        return out


def run_all(s: Scheduler, requests, max_steps=10_000):
    oracle, done, step = Oracle(), {}, 0
    pending = list(requests)
    while pending or s.has_work():
        if pending and step % 3 == 0:  # requests join while others run
            s.add(pending.pop(0))
        batch = s.schedule()
        if batch is not None:
            assert batch.num_tokens <= s.max_batch_tokens and len(s.running) <= s.max_running
            for x in s.running:  # every running sequence's fed tokens fit in the blocks it holds
                assert len(s.blocks.table(x.seq_id)) * s.blocks.block_size >= x.num_computed
            for x, n in zip(batch.seqs, batch.num_new_tokens):
                assert len(s.blocks.table(x.seq_id)) * s.blocks.block_size >= x.num_computed + n
            for x in s.postprocess(batch, oracle.step(batch)):
                done[x.seq_id] = x.output_ids
        s.blocks.check()
        step += 1
        assert step < max_steps
    assert s.blocks.num_free_blocks == s.blocks.num_blocks and s.blocks.num_free_slots == s.blocks.num_slots
    return done


def test_mixed_traffic_under_a_tight_pool_finishes_every_request_with_the_tokens_of_an_ample_pool():
    import random
    rng = random.Random(1)
    specs = [(rng.randint(1, 30), rng.randint(1, 25)) for _ in range(12)]

    def requests():
        return [Sequence(i, [(i * 31 + j) % 97 for j in range(p)], StopCriteria(m, 1000)) for i, (p, m) in
                enumerate(specs)]

    ample = run_all(Scheduler(16, 8, 64, BlockManager(200, 12, 4)), requests())
    tight = Scheduler(16, 8, 64, BlockManager(14, 3, 4))  # 56 tokens, 3 slots: must preempt
    assert run_all(tight, requests()) == ample
    assert tight.num_preemptions > 0
    assert all(len(ample[i]) == m for i, (_, m) in enumerate(specs))
