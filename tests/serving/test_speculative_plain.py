"""Speculative decoding's plain-data side: drafts through the scheduler, and each sequence's acceptance
(the rule that sets k: test_goodput_rule.py)."""
import subprocess
import sys

import pytest

from nextserve.router.acceptance import AcceptanceTracker, SpeculativeConfig, expected_tokens
from nextserve.router.block_manager import BlockManager
from nextserve.router.scheduler import Scheduler, Sequence, StopCriteria


def test_acceptance_rule_does_not_import_torch():
    code = "import sys, nextserve.router.acceptance; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def prefilled(s: Scheduler, *prompt_lens: int, max_tokens: int = 20) -> list[Sequence]:
    seqs = [Sequence(i + 1, list(range(10, 10 + n)), StopCriteria(max_tokens, 1000, eos_token_id=0))
            for i, n in enumerate(prompt_lens)]
    for seq in seqs:
        s.add(seq)
    # one prefill step: each samples its first token, and the MTP head drafts three more
    s.postprocess(s.schedule(), {q.seq_id: [7] for q in seqs}, {q.seq_id: [8, 9, 11] for q in seqs})
    return seqs


def test_drafts_are_fed_with_the_pending_token_and_only_accepted_ones_stay_computed():
    s = Scheduler(128, 8, 8, BlockManager(8, 4))
    a, b = prefilled(s, 63, 5)
    batch = s.schedule()
    assert [(q.seq_id, n) for q, n in zip(batch.seqs, batch.num_new_tokens)] == [(1, 4), (2, 4)]
    assert batch.draft_ids == [[8, 9, 11], [8, 9, 11]] and batch.samples() == [True, True]
    assert len(batch.block_tables[0]) == 2  # blocks for the drafts too: 63 + 4 tokens span two blocks
    # a: accepts 8 and 9, then 12 where 11 was drafted; b: rejects the first draft
    s.postprocess(batch, {1: [8, 9, 12], 2: [5]}, {1: [13], 2: []})
    assert a.output_ids == [7, 8, 9, 12] and a.num_computed == 63 + 3  # 7, 8, 9 held; 12 pending
    assert b.output_ids == [7, 5] and b.num_computed == 5 + 1
    assert (a.num_draft_tokens, a.num_accepted_tokens, b.num_accepted_tokens) == (3, 2, 0)
    assert a.draft_ids == [13] and b.draft_ids == []
    batch = s.schedule()
    assert batch.num_new_tokens == [2, 1] and batch.draft_ids == [[13], []]


def test_drafts_are_cut_to_the_token_budget_and_dropped_on_preemption():
    s = Scheduler(3, 8, 8, BlockManager(4, 2))
    a, = prefilled(s, 2)
    batch = s.schedule()
    assert batch.num_new_tokens == [3] and batch.draft_ids == [[8, 9]]
    s.postprocess(batch, {1: [8, 9, 12]}, {1: [1, 2, 3]})
    assert a.draft_ids == [1, 2, 3]
    s._preempt(a)  # what a decode that finds no free block does to the newest sequence
    assert a.draft_ids == [] and a.num_computed == 0


def test_a_stop_among_accepted_tokens_drops_the_rest():
    s = Scheduler(64, 8, 8, BlockManager(8, 4))
    a, = prefilled(s, 5)
    finished = s.postprocess(s.schedule(), {1: [8, 0, 11, 12]}, {1: [1]})  # eos (0) accepted second
    assert finished == [a] and a.output_ids == [7, 8, 0] and a.finish_reason == "stop"


def test_a_sequences_acceptance_rate_follows_its_recent_drafts():
    config = SpeculativeConfig(4)
    good, bad, fresh = AcceptanceTracker(config), AcceptanceTracker(config), AcceptanceTracker(config)
    assert fresh.rate == 0.5  # one accepted in two before any draft is judged
    for _ in range(10):
        good.record(4, 4)
        bad.record(2, 0)  # a rejected first draft: the second is not judged
    assert good.rate > 0.9 and bad.rate < 0.15
    assert bad.num_judged == 10 and good.num_judged == 40
    for _ in range(30):  # decay: recent drafts outweigh old ones
        bad.record(4, 4)
    assert bad.rate > 0.9
    assert expected_tokens(0.5, 2) == 1.75


def test_a_request_caps_its_drafts_and_penalties_turn_them_off():
    config = SpeculativeConfig(3)
    assert AcceptanceTracker(config).max_k == 3
    assert AcceptanceTracker(config, max_tokens=1).max_k == 1
    assert AcceptanceTracker(config, max_tokens=0).off
    assert AcceptanceTracker(config, can_speculate=False).off


@pytest.mark.parametrize("kwargs,message", [({"num_tokens": 5}, "1..4"), ({"num_tokens": 0}, "1..4"),
                                            ({"num_tokens": 2, "decay": 0.0}, "decay")])
def test_config_rejects_what_it_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)
