"""Two micro-batches ping-pong: one computes while the other's tokens are at the workers; tokens unchanged."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from nextserve.client import Client
from nextserve.router.overlap import ComputeBaton, cut_in_two, ping_pong

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 61)), [100], list(range(300, 317))]
MAX_TOKENS = [6, 4, 8, 5]


@pytest.mark.parametrize("tokens, cut", [
    ([], 0), ([7], 0), ([1, 1], 1), ([1, 1, 1, 1, 1], 3), ([40, 1, 1, 1], 1), ([1, 1, 1, 40], 3), ([3, 3, 30, 3], 3),
])
def test_a_step_is_cut_where_the_token_counts_balance(tokens, cut):
    assert cut_in_two(tokens) == cut


def test_the_baton_passes_to_the_other_micro_batch_while_one_waits_for_the_workers():
    baton, first_holds, workers_answered, order = ComputeBaton(), threading.Event(), threading.Event(), []

    def first():
        with baton.holding():
            order.append("first computes")
            first_holds.set()
            with baton.away():  # its tokens are at the workers; they answer once the second has computed
                assert workers_answered.wait(10)
            order.append("first computes again")

    def second():
        with baton.holding():
            order.append("second computes")
            workers_answered.set()

    with ThreadPoolExecutor(2) as executor:
        done = [executor.submit(first)]
        assert first_holds.wait(10)
        done.append(executor.submit(second))  # blocks on the baton until the first is away
        for f in done:
            f.result(10)
    assert order == ["first computes", "second computes", "first computes again"]
    assert baton.overlaps == 1  # the second computed while the first's tokens were away


def test_away_is_a_no_op_without_the_baton_and_errors_come_back_after_both_finish():
    baton = ComputeBaton()
    with baton.away():  # the usual single forward pass never takes the baton
        pass
    finished = []

    def fails():
        raise RuntimeError("shard 1 is down")

    with ThreadPoolExecutor(2) as executor, pytest.raises(RuntimeError, match="shard 1 is down"):
        ping_pong(baton, executor, [fails, lambda: finished.append(True)])
    assert finished == [True]


def test_ping_ponging_micro_batches_give_the_in_process_tokens(helpers, in_process_workers, routers, reference,
                                                               tiny_checkpoint):
    router = routers(helpers.contiguous_plan(tiny_checkpoint, 2), in_process_workers(2).addresses,
                     max_batch_tokens=16, micro_batches=2)
    with Client(f"127.0.0.1:{router.port}", timeout=60) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(client.generate, p, max_tokens=n, temperature=0, ignore_eos=True)
                   for p, n in zip(PROMPTS, MAX_TOKENS)]
        results = [f.result(timeout=120) for f in futures]
    for prompt, n, got in zip(PROMPTS, MAX_TOKENS, results):
        assert got.token_ids == reference(prompt, n, ignore_eos=True)[0]
    assert router.pool.baton.overlaps > 0  # one micro-batch computed while the other's tokens were away
