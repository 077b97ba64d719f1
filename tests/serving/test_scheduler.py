"""The scheduler on plain data: no torch, no model, no network."""
import sys

import pytest

from nextserve.router.scheduler import QueueFull, ScheduledBatch, Scheduler, Sequence, Status, StopCriteria
from nextserve.router.stop_strings import StopStringMatcher

STOP = StopCriteria(max_tokens=4, context_limit=100, eos_token_id=0)


def seq(seq_id, prompt_len, stop=STOP):
    return Sequence(seq_id, list(range(10, 10 + prompt_len)), stop)


def plan_of(batch: ScheduledBatch):
    return [(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]


def test_scheduler_module_does_not_import_torch():
    import subprocess
    code = "import sys, nextserve.router.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_prompt_is_chunked_under_the_token_budget_and_samples_only_at_its_end():
    s = Scheduler(max_batch_tokens=4, max_running=8, max_queue=8)
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
    s = Scheduler(max_batch_tokens=5, max_running=8, max_queue=8)
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
    s = Scheduler(max_batch_tokens=100, max_running=1, max_queue=2)
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
    s = Scheduler(max_batch_tokens=100, max_running=8, max_queue=8)
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
