"""Speculative decoding in-process: greedy output equals plain greedy, rejection sampling keeps the
target distribution, and a rolled-back DeltaNet state equals one that never saw the rejected drafts."""
import math

import pytest
import torch

from nextserve.model import Qwen3NextForCausalLM, SamplingParams, StaticCache, generate
from nextserve.model.spec_states import keep_state_at
from nextserve.model.state import ForwardBatch
from nextserve.router.acceptance import SpeculativeConfig
from nextserve.router.block_manager import BlockManager, blocks_for
from nextserve.router.cache_budget import PoolSizes
from nextserve.router.goodput import GoodputPolicy
from nextserve.router.runner import ModelRunner
from nextserve.router.scheduler import Scheduler, Sequence, StopCriteria
from nextserve.router.speculative import accept_greedy, accept_sampled, distribution

PROMPT_LENGTHS = (5, 17, 70, 3)  # 70: a prompt longer than one KV block


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, with_mtp=True)


@pytest.fixture(scope="module")
def small_vocab_model(small_vocab_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(small_vocab_checkpoint, dtype=torch.float32, with_mtp=True)


def prompts_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, model.config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("which", ["tiny", "small-vocab"])
def test_speculative_greedy_equals_greedy(k, which, tiny_model, small_vocab_model):
    model = tiny_model if which == "tiny" else small_vocab_model
    prompts = prompts_for(model)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = generate(model, prompts, params)
    # fixed k: every sequence drafts k tokens every step, however few it gets accepted
    spec = generate(model, prompts, params, speculative_tokens=k, speculative_adaptive=False, max_batch_tokens=48)
    for p, s in zip(plain, spec):
        assert s.output_ids == p.output_ids
        assert s.finish_reason == p.finish_reason == "length"
        assert s.num_draft_tokens > 0
    if which == "small-vocab":  # the batch mixes acceptance: some drafts kept, some rejected, unequally
        accepted = [s.num_accepted_tokens for s in spec]
        assert sum(accepted) > 0 and any(s.num_accepted_tokens < s.num_draft_tokens for s in spec)
        assert len(set(accepted)) > 1


def test_speculation_stops_at_eos_among_accepted_tokens(small_vocab_model):
    # eos = the token greedy decoding produces third: it ends the output even when accepted mid-step
    prompts = prompts_for(small_vocab_model, seed=3)
    plain = generate(small_vocab_model, prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    eos = plain[0].output_ids[2]
    params = SamplingParams(max_tokens=24, temperature=0)
    expected = generate(small_vocab_model, prompts, params, eos)
    got = generate(small_vocab_model, prompts, params, eos, speculative_tokens=3, speculative_adaptive=False)
    assert [c.output_ids for c in got] == [c.output_ids for c in expected]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in expected]
    assert got[0].output_ids[-1] == eos and len(got[0].output_ids) <= 3


def test_speculation_under_memory_pressure_preempts_and_still_matches(small_vocab_model):
    prompts = [p * 3 for p in prompts_for(small_vocab_model, seed=5)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = generate(small_vocab_model, prompts, params)
    spec = generate(small_vocab_model, prompts, params, speculative_tokens=2, speculative_adaptive=False,
                    kv_cache_memory="300KiB")  # a few blocks: sequences are preempted and recomputed
    assert [c.output_ids for c in spec] == [c.output_ids for c in plain]


def test_seeded_speculative_sampling_is_reproducible(small_vocab_model):
    prompts = prompts_for(small_vocab_model)
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(prompts))]
    first = generate(small_vocab_model, prompts, params, speculative_tokens=2, speculative_adaptive=False)
    again = generate(small_vocab_model, prompts[::-1], params[::-1], speculative_tokens=2, speculative_adaptive=False)[::-1]
    assert [c.output_ids for c in first] == [c.output_ids for c in again]
    assert all(len(c.output_ids) == 16 for c in first)


class GivenCosts(GoodputPolicy):
    """The goodput rule itself, timed by `cost(step, k)` (seconds of a step with k drafts, at the rule's
    step-th decision) instead of the decoder's clock; it records the k of every decision."""

    def __init__(self, cost, max_k=2):
        super().__init__(max_k, probe_every=2, max_probe_every=4)
        self.cost, self.chosen = cost, []

    def choose(self, rows):
        self.chosen.append(super().choose(rows))
        return self.chosen[-1]

    def observe(self, num_rows, phase, k, seconds):
        super().observe(num_rows, phase, k, self.cost(len(self.chosen), k) / 2)


def generate_with_rule(model, prompts, params, policy, backlog_capacity=None, after_step=None):
    """`generate`'s loop (the router's scheduler and runner) with `policy` choosing each step's k;
    after_step(runner, batch) runs after each step."""
    stops = [StopCriteria(params.max_tokens, model.config.max_position_embeddings, ignore_eos=True) for _ in prompts]
    sizes = PoolSizes(sum(blocks_for(s.max_fed_tokens(len(p))) for p, s in zip(prompts, stops)), len(prompts), 0, 0)
    scheduler = Scheduler(48, len(prompts), len(prompts), BlockManager(sizes.num_blocks, sizes.num_slots))
    runner = ModelRunner(model, sizes, speculative=SpeculativeConfig(policy.max_k))
    runner.speculative.policy = policy
    if backlog_capacity is not None:
        runner.speculative.backlog_capacity = backlog_capacity
    seqs = [Sequence(i, list(p), stop) for i, (p, stop) in enumerate(zip(prompts, stops))]
    for seq in seqs:
        scheduler.add(seq)
        runner.add(seq.seq_id, params)
    while scheduler.has_work():
        batch = scheduler.schedule()
        scheduler.postprocess(batch, runner.step(batch), runner.drafts)
        if after_step is not None:
            after_step(runner, batch)
    return seqs


def mtp_keys(pools, layer, table, length):
    """The MTP head's keys and values at positions [0, length) of a sequence with this block table."""
    slots = torch.tensor([table[p // 64] * 64 + p % 64 for p in range(length)])
    return [cache.view(-1, *cache.shape[2:])[slots].clone() for cache in pools.kv[layer]]


@pytest.mark.parametrize("which", ["tiny", "small-vocab"])
def test_greedy_stays_exact_and_the_mtp_cache_whole_while_the_rule_switches_k_off_and_on(
        which, tiny_model, small_vocab_model, close, model_chain):
    """Drafts pay, then cost far more than they yield, then pay again: the rule goes from drafting to
    k = 0 and back (its positions waited in backlogs, some past their capacity). The output is plain
    greedy's, and when drafting has resumed the MTP head's keys at every position it holds equal those
    of one full pass of the head over the sequence."""
    model = tiny_model if which == "tiny" else small_vocab_model
    cfg, layer = model.config, model.config.num_hidden_layers
    prompts = prompts_for(model)[:3]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = generate(model, prompts, params)
    dear = lambda step: 10 <= step < 24  # noqa: E731
    rule = GivenCosts(lambda step, k: 1.0 + (3.0 if dear(step) else 0.01) * k)
    held = {}  # seq_id -> (tokens, block table, MTP keys) at its last step that drafted

    def after_step(runner, batch):
        for seq, table in zip(batch.seqs, batch.block_tables):
            if runner.drafts.get(seq.seq_id):
                tokens = (seq.prompt_ids + seq.output_ids)[:seq.num_computed + 1]
                held[seq.seq_id] = (tokens, mtp_keys(runner.pools, layer, table, seq.num_computed))

    seqs = generate_with_rule(model, prompts, params, rule, backlog_capacity=4, after_step=after_step)
    assert [s.output_ids for s in seqs] == [c.output_ids for c in plain]
    switched_to, switched_from = switches(rule.chosen)
    assert 0 in switched_to and 0 in switched_from  # off, and on again
    assert 0 in rule.chosen[12:24] and any(rule.chosen[26:])
    assert held and all(s.num_draft_tokens > 0 for s in seqs)
    for seq_id, (tokens, keys) in held.items():
        n = len(tokens) - 1
        cache = StaticCache(model, 1, n)
        batch = cache.batch([0], [n])
        _, hidden = model.forward_batch(torch.tensor(tokens[:-1]), batch, all_logits=True)
        model.mtp(model.model.embed_tokens(torch.tensor(tokens[1:])), hidden, batch)
        for got, want in zip(keys, mtp_keys(cache.pools, layer, cache.tables[0], n)):
            close(got, want, reduction=model_chain(cfg, n) + 2 * cfg.hidden_size, what=f"sequence {seq_id} MTP cache")


class Scripted(GoodputPolicy):
    """Chooses k by the decision's index (`ks(i)`) and records every observation as measured."""

    def __init__(self, max_k, ks):
        super().__init__(max_k)
        self.ks, self.chosen, self.seen = ks, [], []

    def choose(self, rows):
        self.chosen.append(self.ks(len(self.chosen)))
        return self.chosen[-1]

    def observe(self, num_rows, phase, k, seconds):
        self.seen.append((len(self.chosen), phase, k, seconds))
        super().observe(num_rows, phase, k, seconds)


def test_the_backlogs_catch_up_is_not_counted_as_the_cost_of_drafting(small_vocab_model, monkeypatch):
    """Steps without drafts defer the MTP head's keys and values; the first drafting step after them
    writes those first. That pass is k = 0's deferred work: the rule must see the drafting step's own
    cost for k = 1, not the catch-up (made slow here on purpose), or it would judge drafting by it."""
    from nextserve.router import speculative
    delay, catching_up, catch_ups = 0.3, [], []
    decoder = speculative.SpeculativeDecoder
    catch_up, write_kv = decoder._catch_up, decoder._write_kv

    def timed_catch_up(self, *args):
        catching_up.append(True)
        try:
            seconds = catch_up(self, *args)
        finally:
            catching_up.pop()
        if seconds:
            catch_ups.append((len(rule.chosen), seconds))
        return seconds

    def slow_write_kv(self, *args):
        if catching_up:
            speculative.time.sleep(delay)
        write_kv(self, *args)

    monkeypatch.setattr(decoder, "_catch_up", timed_catch_up)
    monkeypatch.setattr(decoder, "_write_kv", slow_write_kv)
    rule = Scripted(2, lambda i: 0 if i < 6 else 1)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = prompts_for(small_vocab_model)[:2]
    seqs = generate_with_rule(small_vocab_model, prompts, params, rule)
    assert [s.output_ids for s in seqs] == [c.output_ids for c in generate(small_vocab_model, prompts, params)]
    # the switch to k = 1 took the backlogs in, once, slowly
    assert len(catch_ups) == 1 and catch_ups[0][1] >= delay
    drafting = [(k, seconds) for decision, phase, k, seconds in rule.seen if decision == catch_ups[0][0] and phase == "draft"]
    assert len(drafting) == 1 and drafting[0][0] == 1
    assert drafting[0][1] < delay / 2


def switches(chosen):
    """(the ks it switched to, from) over a run of decisions."""
    pairs = [(a, b) for a, b in zip(chosen, chosen[1:]) if a != b]
    return {b for _, b in pairs}, {a for a, _ in pairs}


def verify_pass(model, cache, seq, tokens):
    """Feed `tokens` to sequence `seq` of `cache` as one verification (keeping per-token states)."""
    batch = ForwardBatch.build(cache.pools, [cache.lengths[seq]], [len(tokens)], [cache.tables[seq]], [seq],
                               cache.device, keep_states_rows=1)
    cache.lengths[seq] += len(tokens)
    logits = model.lm_head(model.model(torch.tensor(tokens), batch)).float()
    return batch, logits


@pytest.mark.parametrize("kept", [0, 1, 3], ids=["all-rejected", "one-accepted", "all-but-last"])
def test_rolled_back_state_equals_a_run_that_never_saw_the_rejected_drafts(tiny_model, kept, close, logits_close,
                                                                          model_chain):
    model, cfg = tiny_model, tiny_model.config
    g = torch.Generator().manual_seed(kept)
    prefix = torch.randint(1, cfg.vocab_size, (66,), generator=g).tolist()  # into a second KV block
    fed = torch.randint(1, cfg.vocab_size, (5,), generator=g).tolist()      # pending token + 4 drafts
    after = torch.randint(1, cfg.vocab_size, (3,), generator=g).tolist()    # what comes after the kept ones

    spec = StaticCache(model, 1, 80)
    model.forward_batch(torch.tensor(prefix), spec.batch([0], [len(prefix)]))
    batch, verify_logits = verify_pass(model, spec, 0, fed)
    keep_state_at(batch, [0], {0: kept})
    spec.lengths[0] = len(prefix) + kept + 1  # the KV of the rejected positions stays, unread

    plain = StaticCache(model, 1, 80)
    model.forward_batch(torch.tensor(prefix), plain.batch([0], [len(prefix)]))
    for t in fed[:kept + 1]:  # token by token, as plain decoding would have fed them
        plain_logits, _ = model.forward_batch(torch.tensor([t]), plain.batch([0], [1]))
    logits_close(verify_logits[kept], plain_logits[0], cfg, len(prefix) + kept + 1)

    rolled, expected = spec.pools.read_state(0), plain.pools.read_state(0)
    chain = model_chain(cfg, len(prefix) + kept + 1)
    for layer, (r, e) in enumerate(zip(rolled, expected)):
        if e is None:
            continue
        close(r.conv, e.conv, reduction=chain, what=f"layer {layer} conv window")
        close(r.recurrent, e.recurrent, reduction=chain, what=f"layer {layer} recurrent state")
    # and the sequence goes on as if the drafts were never fed: their keys are overwritten or unread
    for t in after:
        got, _ = model.forward_batch(torch.tensor([t]), spec.batch([0], [1]))
        want, _ = model.forward_batch(torch.tensor([t]), plain.batch([0], [1]))
        logits_close(got, want, cfg, spec.lengths[0])


@pytest.mark.parametrize("fed_lengths, slots", [((4, 3, 5), [0, 1, 2]), ((3, 3, 3), [0, 1, 2]), ((3, 3, 3), [2, 0, 1])],
                         ids=["ragged", "equal-lengths", "equal-lengths-unordered-slots"])
def test_rollback_of_several_rows_in_one_pass_gives_each_its_own_state(tiny_model, close, model_chain,
                                                                       fed_lengths, slots):
    """Rows verified together, each rolled back to its own token (one into its start window): per-row
    indexing of the packed states, done for all rows at once. Rows of equal length (every row drafted
    the same k) run the decode kernels on an [m, k + 1] layout, by a slot range when their slots are
    consecutive; ragged ones the packed form."""
    model, cfg = tiny_model, tiny_model.config
    g = torch.Generator().manual_seed(7)
    prefixes = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 66, 20)]
    fed = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in fed_lengths]
    kept = {0: 2, 2: 0}  # row 1 keeps all of its tokens
    spec, plain = StaticCache(model, 3, 80), StaticCache(model, 3, 80)
    for cache in (spec, plain):
        for n, prefix in enumerate(prefixes):
            model.forward_batch(torch.tensor(prefix), cache.batch([n], [len(prefix)]))
    # sequence n lives in slot n of both caches; the pass lists them in `slots` order
    order = slots
    batch = ForwardBatch.build(spec.pools, [len(prefixes[n]) for n in order], [len(fed[n]) for n in order],
                               [spec.tables[n] for n in order], order, spec.device, keep_states_rows=3)
    model.model(torch.tensor([t for n in order for t in fed[n]]), batch)
    keep_state_at(batch, order, {order.index(n): j for n, j in kept.items()})
    for n, tokens in enumerate(fed):
        for t in tokens[:kept.get(n, len(tokens) - 1) + 1]:
            model.forward_batch(torch.tensor([t]), plain.batch([n], [1]))
    for n in range(3):
        chain = model_chain(cfg, len(prefixes[n]) + len(fed[n]))
        for layer, (r, e) in enumerate(zip(spec.pools.read_state(n), plain.pools.read_state(n))):
            if e is not None:
                close(r.conv, e.conv, reduction=chain, what=f"row {n} layer {layer} conv window")
                close(r.recurrent, e.recurrent, reduction=chain, what=f"row {n} layer {layer} recurrent state")


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_one_more():
    logits = torch.full((4, 6), -1.0)
    for position, best in enumerate([2, 5, 1, 4]):
        logits[position, best] = 1.0
    best = logits.argmax(-1).tolist()
    assert accept_greedy(best, [2, 5, 1]) == [2, 5, 1, 4]
    assert accept_greedy(best, [2, 3, 1]) == [2, 5]
    assert accept_greedy(best, [0, 5, 1]) == [2]


# --- rejection sampling keeps the target distribution ------------------------------------------------

def chi_square_bound(df: int, z: float = 4.265) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z = 4.265: a false alarm once in 100,000 runs."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token the target gives no mass was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def biased_accept(target_logits, drafts, draft_probs, params, generator):
    """The classic bug: on a rejection, draw from the target itself instead of norm(max(p - q, 0))."""
    p = distribution(target_logits, params)
    u = float(torch.rand((), generator=generator))
    if u * float(draft_probs[0, drafts[0]]) <= float(p[0, drafts[0]]):
        return [drafts[0]]
    noise = torch.empty_like(p[0]).exponential_(generator=generator)
    return [int(torch.argmax(p[0] / noise))]


def first_token_counts(accept, target_logits, q, params, n):
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(q.shape[-1])
    for _ in range(n):
        noise = torch.empty_like(q[0]).exponential_(generator=g)
        draft = int(torch.argmax(q[0] / noise))  # the drafter's own draw from q
        counts[accept(target_logits, [draft], q, params, g)[0]] += 1
    return counts


@pytest.fixture(scope="module")
def target_and_draft(small_vocab_model):
    """Target logits at a real position of the model, and its MTP head's draft distribution there."""
    model = small_vocab_model
    cache = StaticCache(model, 1, 16)
    ids = torch.tensor([3, 1, 4, 1, 5, 2, 6])
    batch = cache.batch([0], [len(ids)])
    logits, hidden = model.forward_batch(ids, batch, all_logits=True)
    draft_logits = model.mtp_logits(torch.cat([ids[1:], torch.tensor([7])]), hidden, batch)
    return logits[-2:], draft_logits[-1:]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
                                    SamplingParams(temperature=1.3, top_p=0.8)], ids=["t1", "t0.7-topk5", "t1.3-topp0.8"])
def test_rejection_sampling_draws_from_the_target_distribution(target_and_draft, params):
    target_logits, draft_logits = target_and_draft
    q = distribution(draft_logits, params)
    p = distribution(target_logits, params)[0]
    assert float((p - q[0]).abs().sum()) > 0.3  # the draft distribution is far from the target's
    n = 4000
    counts = first_token_counts(accept_sampled, target_logits, q, params, n)
    df = int((p > 0).sum()) - 1
    assert chi_square(counts, p) < chi_square_bound(df)


def test_the_chi_square_check_catches_a_biased_acceptance_rule(target_and_draft):
    target_logits, draft_logits = target_and_draft
    params = SamplingParams(temperature=1.0)
    q, p = distribution(draft_logits, params), distribution(target_logits, params)[0]
    counts = first_token_counts(biased_accept, target_logits, q, params, 4000)
    assert chi_square(counts, p) > chi_square_bound(int((p > 0).sum()) - 1)


def test_a_request_chooses_its_own_number_of_drafts_or_none(small_vocab_model):
    prompts = prompts_for(small_vocab_model)[:3]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, speculative_tokens=k) for k in (0, 1, None)]
    plain = generate(small_vocab_model, prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    got = generate(small_vocab_model, prompts, params, speculative_tokens=3, speculative_adaptive=False)
    assert [c.output_ids for c in got] == [c.output_ids for c in plain]
    off, one, default = got
    assert off.num_draft_tokens == 0
    assert 0 < one.num_draft_tokens <= 11 < default.num_draft_tokens  # at most one draft per step vs three
    with pytest.raises(ValueError, match="without speculative decoding"):
        generate(small_vocab_model, prompts[:1], params[1])
    with pytest.raises(ValueError, match="speculative_tokens must be in 0..4"):
        SamplingParams(speculative_tokens=5)


def test_speculative_sampling_through_the_engine_keeps_the_models_distribution(small_vocab_model):
    """End to end: the second token of 2,000 seeded requests is the first one drawn by verification
    (its draft comes from the MTP head after the prefill); its counts must match the model's marginal
    sum_x1 p(x1 | prompt) p(x2 | prompt, x1)."""
    model, prompt, n = small_vocab_model, [3, 1, 4, 1, 5], 2000
    # max_tokens 3: a draft is made only where its verification can yield a token the request keeps
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=i, ignore_eos=True) for i in range(n)]
    done = generate(model, [prompt] * n, params, speculative_tokens=1, speculative_adaptive=False, max_batch_tokens=16384)
    assert all(c.num_draft_tokens == 1 for c in done)  # every second token went through rejection sampling
    V = model.config.vocab_size
    first = model(torch.tensor([prompt]))[0, -1].softmax(-1)
    following = model(torch.tensor([prompt + [x] for x in range(V)]))[:, -1].softmax(-1)  # [x1, x2]
    marginal = (first[:, None] * following).sum(0)
    counts = torch.bincount(torch.tensor([c.output_ids[1] for c in done]), minlength=V).float()
    assert chi_square(counts, marginal) < chi_square_bound(int((marginal > 0).sum()) - 1)
