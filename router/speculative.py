"""Speculative decoding with the MTP head: draft, verify in one pass, accept, roll back, draft again.

One step of `SpeculativeDecoder.step` over a scheduled batch:
  1. one forward pass of the main model over every row's new tokens; a row with drafts feeds its
     pending token and its k drafts, and its DeltaNet layers keep the state after each of them
     (rows with drafts go first in the pass: `ForwardBatch.keep_states_rows`);
  2. per row with drafts, acceptance: greedy keeps the drafts equal to the model's argmax; sampling
     keeps draft d with probability min(1, p(d) / q(d)) and on a rejection samples from
     norm(max(p - q, 0)) (Leviathan et al. 2023, Chen et al. 2023), so the tokens follow the target
     distribution p exactly; either way one more token comes from the first position not accepted
     (or after the last draft);
  3. rollback: a row that kept j + 1 of its k + 1 tokens gets the DeltaNet state after token j
     (model/spec_states.py); the keys of the rest stay past its length, unread, until overwritten;
  4. the k of the next step, one for the batch, by router/goodput.py's rule from the times this
     engine measured (steps 1-3 are the "verify" phase, step 5 the "draft" phase);
  5. with k > 0 the MTP head runs over every position the sequence now holds that it has not seen
     (its own attention layer keeps KV like the main layers); only the last position of each
     sequence goes through the whole layer and drafts token 1, tokens 2..k chain the MTP layer on its
     own output, one position at a time (as vLLM and SGLang run a one-layer MTP), with one host
     transfer for all drafts at the end. With k = 0 nothing is drafted: prompt chunks still give the
     head their keys and values, decoding positions wait (router/mtp_backlog.py) and the next
     drafting step first writes their keys and values (a pass of its own, which the goodput rule
     does not count as that step's cost of drafting: k = 0 deferred it), so that drafting resumes
     on a whole cache.
Drafts fit in the blocks the sequence holds and within its token limits. Requests with penalties do
not speculate (a penalty at a draft position would depend on the drafts before it), nor, under the
adaptive rule, seeded sampling requests (their k would follow measured times, and a seed must give
the same tokens in every run).
"""
from __future__ import annotations

import time

import torch

from nextserve.kernels.paging import BLOCK_SIZE
from nextserve.model.qwen3_next import Qwen3NextForCausalLM
from nextserve.model.sampling import Sampler, SamplingParams, filter_top_k_top_p, sample_batch
from nextserve.model.spec_states import keep_state_at
from nextserve.model.state import CachePools, ForwardBatch

from .acceptance import AcceptanceTracker, SpeculativeConfig
from .goodput import GoodputPolicy
from .mtp_backlog import DEFAULT_CAPACITY, Backlog
from .scheduler import ScheduledBatch
from .snapshots import SnapshotStore, checkpoints_inside, take_snapshots, want_checkpoints


def can_speculate(params: SamplingParams) -> bool:
    return (params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's distribution over the vocabulary for logits [..., V] (no penalties): temperature,
    top-k, top-p. Greedy has no distribution: callers take the argmax instead."""
    rows = logits.reshape(-1, logits.shape[-1]).float() / params.temperature
    return torch.stack([filter_top_k_top_p(r, params.top_k, params.top_p).softmax(-1) for r in rows]).view_as(logits)


def race(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token from probs [V] as a 0-d tensor on its device (the exponential race, as `Sampler` draws)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return torch.argmax(probs / noise)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(race(probs, generator))


def accept_greedy(best: list[int], drafts: list[int]) -> list[int]:
    """best: the model's argmax at the pending token and each draft (k + 1 ids). Returns the accepted
    drafts and one token more: exactly what k + 1 greedy decode steps would produce."""
    out = []
    for d, t in zip(drafts, best):
        out.append(t)
        if t != d:
            return out
    return out + [best[len(drafts)]]


def accept_sampled(target_logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor,
                   params: SamplingParams, generator: torch.Generator) -> list[int]:
    """Rejection sampling: target_logits [k + 1, V], draft_probs [k, V] the distributions the drafts
    were drawn from. The returned tokens are distributed as k + 1 draws from the target."""
    p = distribution(target_logits, params)
    out = []
    for j, d in enumerate(drafts):
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * float(draft_probs[j, d]) <= float(p[j, d]):
            out.append(d)
            continue
        residual = (p[j] - draft_probs[j]).clamp_min(0)
        total = float(residual.sum())
        out.append(draw(residual / total if total > 0 else p[j], generator))
        return out
    return out + [draw(p[len(drafts)], generator)]


class SpeculativeDecoder:
    """The runner's step when speculation is on. Holds each sequence's acceptance tracker, the
    distributions its pending drafts were drawn from, and the rule that picks each step's k."""

    def __init__(self, model: Qwen3NextForCausalLM, pools: CachePools, config: SpeculativeConfig, device):
        if model.mtp is None:
            raise ValueError("speculative decoding drafts with the MTP head: load the model with with_mtp=True "
                             "(a checkpoint with mtp.* tensors)")
        self.model, self.pools, self.config, self.device = model, pools, config, device
        self.policy = GoodputPolicy(config.num_tokens) if config.adaptive else None  # None: always K
        self.trackers: dict[int, AcceptanceTracker] = {}
        self.draft_probs: dict[int, torch.Tensor] = {}
        self.mtp_layer = model.config.num_hidden_layers  # the MTP attention layer's key in the pools
        self.last_k = config.num_tokens  # the k the last decision chose
        self.backlogs: dict[int, Backlog] = {}  # seq_id -> positions the MTP head has yet to take in
        self.backlog_capacity = DEFAULT_CAPACITY

    def add(self, seq_id: int, params: SamplingParams) -> None:
        seeded = self.policy is not None and not params.greedy and params.seed is not None
        self.trackers[seq_id] = AcceptanceTracker(self.config, params.speculative_tokens,
                                                  can_speculate(params) and not seeded)

    def free(self, seq_id: int) -> None:
        self.trackers.pop(seq_id, None)
        self.draft_probs.pop(seq_id, None)
        self.backlogs.pop(seq_id, None)

    def step(self, batch: ScheduledBatch, samplers: dict[int, Sampler],
             snapshots: SnapshotStore) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """(seq_id -> new tokens, seq_id -> drafts for the next step); the prefix cache's state
        snapshots the batch asks for go into `snapshots`."""
        start = time.perf_counter()
        order = sorted(range(len(batch.seqs)), key=lambda i: not batch.drafts(i))  # rows with drafts first
        seqs = [batch.seqs[i] for i in order]
        drafts = [batch.drafts(i) for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        reaches_end = batch.samples()
        samples = [reaches_end[i] for i in order]
        slots = [batch.state_slots[i] for i in order]
        tables = [batch.block_tables[i] for i in order]
        m = sum(1 for d in drafts if d)
        rows = [s.token_slice(1) + d if d else s.token_slice(n) for s, d, n in zip(seqs, drafts, counts)]
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=self.device)
        # The prefix cache's snapshots are due in prompt chunks only (never in a verified row: the
        # scheduler plans none in decodes), at positions every token before which the model keeps.
        row_of = {i: j for j, i in enumerate(order)}
        due = [(row_of[i], p, key) for i, p, key in batch.snapshots]
        computed = [s.num_computed for s in seqs]
        inside = checkpoints_inside(due, computed, counts)
        forward = ForwardBatch.build(self.pools, computed, counts, tables, slots, self.device,
                                     record_checkpoints=inside, keep_states_rows=m)
        if inside:
            want_checkpoints(forward, due)
        hidden = self.model.model(ids, forward)
        new_tokens, kept = self._verify(seqs, drafts, samples, forward, hidden, samplers)
        keep_state_at(forward, slots, kept)
        take_snapshots(self.pools, snapshots, forward, due, computed, counts, slots)
        verified = time.perf_counter()
        # a step in which every row decoded is one whose cost the rule can compare (a prompt chunk would
        # dwarf the difference); its verify time counts before the rule chooses the next k
        timed = self.policy is not None and all(s and n == 1 + len(d) for s, n, d in zip(samples, counts, drafts))
        if timed:
            self.policy.observe(len(seqs), "verify", max(len(d) for d in drafts), verified - start)
        proposed, caught_up = self._draft(seqs, rows, drafts, counts, tables, slots, forward, hidden, new_tokens,
                                          samplers)
        drafted = max((len(p) for p in proposed.values()), default=0)
        if timed and (drafted or self.last_k == 0):  # (an MTP pass no row could draft from is no k's cost)
            # the backlogs' catch-up is what steps without drafts deferred, not a cost of drafting k
            self.policy.observe(len(seqs), "draft", drafted, time.perf_counter() - verified - caught_up)
        return new_tokens, proposed

    def _verify(self, seqs, drafts, samples, forward, hidden, samplers) -> tuple[dict[int, list[int]], dict[int, int]]:
        """New tokens per sequence that reached its end, and row -> index of the last token kept for the
        verified rows that rejected a draft."""
        spans = forward.spans
        # logits at every position of a verified row, at the last position of any other sampling row
        picks = [list(range(a, b)) if d else [b - 1] for (a, b), d, s in zip(spans, drafts, samples) if d or s]
        index = [i for p in picks for i in p]
        logits = self.model.lm_head(hidden if len(index) == hidden.shape[0] else hidden[index]).float()
        greedy_verified = any(d and samplers[s.seq_id].params.greedy for s, d in zip(seqs, drafts))
        best = logits.argmax(-1).tolist() if greedy_verified else None  # one transfer for every greedy row

        new_tokens: dict[int, list[int]] = {}
        kept: dict[int, int] = {}
        plain_rows, plain_logits, start = [], [], 0
        for r, (seq, d) in enumerate(zip(seqs, drafts)):
            if not (d or samples[r]):
                continue
            width = len(d) + 1 if d else 1
            at = start
            start += width
            if not d:
                plain_rows.append(r)
                plain_logits.append(at)
                continue
            sampler = samplers[seq.seq_id]
            if sampler.params.greedy:
                tokens = accept_greedy(best[at:at + width], d)
            else:
                tokens = accept_sampled(logits[at:at + width], d, self.draft_probs[seq.seq_id], sampler.params,
                                        sampler.generator)
            self.trackers[seq.seq_id].record(len(d), len(tokens) - 1)
            if len(tokens) - 1 < len(d):
                kept[r] = len(tokens) - 1
            new_tokens[seq.seq_id] = tokens
        if plain_rows:
            plain = logits if len(plain_logits) == logits.shape[0] else logits[plain_logits]
            sampled = sample_batch(plain, [samplers[seqs[r].seq_id] for r in plain_rows],
                                   [(seqs[r].prompt_ids, seqs[r].output_ids) for r in plain_rows])
            for r, t in zip(plain_rows, sampled):
                new_tokens[seqs[r].seq_id] = [t]
        return new_tokens, kept

    def _draft(self, seqs, rows, drafts, counts, tables, slots, forward, hidden, new_tokens,
               samplers) -> tuple[dict[int, list[int]], float]:
        """Choose the next step's k; run the MTP head over the positions each sequence now holds (with
        k = 0 only prompt chunks, the rest wait: router/mtp_backlog.py) and draft. Returns
        (seq_id -> drafts, none for sequences that do not draft; the seconds spent taking in backlogs)."""
        # Every row, drafting or not, gives the head its keys and values: the prefix cache shares a
        # sequence's blocks with later ones, which may draft, so no block may hold stale MTP rows.
        mtp_rows = list(range(len(seqs)))
        lengths, following, held = {}, {}, {}
        for r in mtp_rows:
            seq, tokens = seqs[r], new_tokens.get(seqs[r].seq_id)
            # The positions it holds after this step, each with the token that follows it.
            if drafts[r]:  # verified: the pending token and the accepted drafts, followed by the new tokens
                lengths[r], following[r] = len(tokens), tokens
            elif tokens is not None:  # its last known token was fed: the sampled one follows it
                lengths[r], following[r] = counts[r], rows[r][1:] + tokens
            else:  # a prompt chunk: the next prompt token follows it
                lengths[r], following[r] = counts[r], seq.token_slice(counts[r] + 1)[1:]
            held[r] = seq.num_computed + lengths[r]  # the sequence's length once this step is applied
            backlog = self.backlogs.get(seq.seq_id)
            if backlog is not None and backlog.end != seq.num_computed:
                del self.backlogs[seq.seq_id]  # it started over (preempted): those positions come again
        # Who may draft, and how many at most: a sequence that decodes next, within its blocks and limits.
        ceilings = []
        for r, seq in enumerate(seqs):
            if seq.seq_id not in new_tokens:
                continue
            cap = 0
            if r in held:
                # chained drafts write MTP keys up to position held + k - 2, in blocks it holds; the next
                # verification feeds held + k + 1 tokens in all, within what the request may ever hold
                room = min(len(tables[r]) * BLOCK_SIZE - held[r] + 1,
                           seq.stop.max_fed_tokens(len(seq.prompt_ids)) - held[r] - 1)
                cap = max(0, min(self.trackers[seq.seq_id].max_k, room))
            ceilings.append((seq.seq_id, cap))
        if ceilings:  # (a step of prompt chunks only decides nothing: its MTP pass is the last decision's kind)
            self.last_k = self._choose_k(ceilings)
        if self.last_k == 0:
            self._defer(seqs, mtp_rows, lengths, following, tables, slots, forward, hidden)
            return {}, 0.0
        caught_up = self._catch_up(seqs, mtp_rows, tables, slots)
        spans = forward.spans
        batch = forward.prefix_of(mtp_rows, [lengths[r] for r in mtp_rows])
        states = hidden if batch is forward else \
            hidden[[i for r in mtp_rows for i in range(spans[r][0], spans[r][0] + lengths[r])]]
        follow = [t for r in mtp_rows for t in following[r]]
        embeds = self.model.model.embed_tokens(torch.tensor(follow, dtype=torch.long, device=self.device))
        # only each row's last position goes through the whole layer: the others just fill its cache
        out = self.model.mtp(embeds, states, batch, last_only=True)
        caps = dict(ceilings)
        plans = [(r, min(self.last_k, caps[seqs[r].seq_id]), n) for n, r in enumerate(mtp_rows)
                 if caps.get(seqs[r].seq_id, 0) > 0]
        if not plans:
            return {}, caught_up
        return self._chain(seqs, tables, slots, held, batch, out, plans, samplers), caught_up

    def _catch_up(self, seqs, mtp_rows, tables, slots) -> float:
        """The head's keys and values at the positions waiting in these rows' backlogs, in one pass
        before this step's own (whose drafts attend to them). Returns its seconds: what the steps
        without drafts deferred, which the goodput rule does not count as the cost of drafting."""
        waited = [(r, self.backlogs.pop(seqs[r].seq_id)) for r in mtp_rows if seqs[r].seq_id in self.backlogs]
        if not waited:
            return 0.0
        start = time.perf_counter()
        self._write_kv([(r, backlog.start, backlog.states(), backlog.following) for r, backlog in waited],
                       tables, slots)
        return time.perf_counter() - start

    def _write_kv(self, entries, tables, slots) -> None:
        """The MTP head's keys and values only, for entries (row, first position, hidden [n, H], the n
        tokens following)."""
        batch = ForwardBatch.build(self.pools, [start for _, start, _, _ in entries], [len(f) for *_, f in entries],
                                   [tables[r] for r, *_ in entries], [slots[r] for r, *_ in entries], self.device)
        states = torch.cat([h for _, _, h, _ in entries])
        ids = torch.tensor([t for *_, f in entries for t in f], dtype=torch.long, device=self.device)
        self.model.mtp.write_kv(self.model.model.embed_tokens(ids), states, batch)

    def _defer(self, seqs, mtp_rows, lengths, following, tables, slots, forward, hidden) -> None:
        """A step without drafts: decoding rows' positions wait in their backlogs, their MTP keys zeroed
        meanwhile; prompt chunks (whose blocks the prefix cache may share at once) and full backlogs go
        through the head's keys-and-values pass now."""
        spans = forward.spans
        waiting, now = [], []  # rows whose positions wait; (row, first position, hidden, following) to write
        for r in mtp_rows:
            seq, first = seqs[r], spans[r][0]
            if seq.is_prefilling:
                now.append((r, seq.num_computed, hidden[first:first + lengths[r]], following[r]))
                continue
            waiting.append(r)
            backlog = self.backlogs.setdefault(seq.seq_id, Backlog(seq.num_computed))
            backlog.add(hidden, first, first + lengths[r], following[r])
            if backlog.length >= self.backlog_capacity:
                del self.backlogs[seq.seq_id]
                now.append((r, backlog.start, backlog.states(), backlog.following))
        if waiting:
            every = len(waiting) == len(spans) and all(lengths[r] == forward.seq_lens[r] for r in waiting)
            at = forward.slot_mapping if every else forward.slot_mapping[
                [i for r in waiting for i in range(spans[r][0], spans[r][0] + lengths[r])]]
            for cache in self.pools.kv[self.mtp_layer]:
                cache.view(-1, *cache.shape[2:]).index_fill_(0, at, 0)
        if now:
            self._write_kv(now, tables, slots)

    def _choose_k(self, ceilings: list[tuple[int, int]]) -> int:
        """The next step's k for the batch; ceilings: (seq_id, most drafts it may make) per sequence that
        decodes next step (0 for one that never drafts: it is still in the step and in its cost)."""
        if self.policy is None:
            return self.config.num_tokens
        return self.policy.choose([(self.trackers[seq_id].optimistic_rate, cap) for seq_id, cap in ceilings])

    def _chain(self, seqs, tables, slots, held, batch, out, plans, samplers) -> dict[int, list[int]]:
        """Draft plans' tokens: plans holds (row, k, its row in `out`, the MTP output at its last position). Draft 1
        comes from the MTP output there; draft j + 1 from the MTP layer run on its own output and draft j
        at the next position. The drafts stay on the device until one transfer at the end."""
        embed, mtp, lm_head = self.model.model.embed_tokens, self.model.mtp, self.model.lm_head
        state = out[[end for _, _, end in plans]]  # [P, H]
        active = list(range(len(plans)))
        drawn: list[tuple[list[int], torch.Tensor]] = []  # per draft step: (plans drafting, their tokens)
        probs: dict[int, list[torch.Tensor]] = {}
        row_tables = [tables[r] for r, _, _ in plans]
        # the MTP batch's padded tables serve the chained passes while every one of its rows drafts
        tables_t = batch.block_tables if len(plans) == len(batch.seq_lens) else None
        slots_t = torch.tensor([slots[r] for r, _, _ in plans], device=self.device)
        for j in range(1, max(k for _, k, _ in plans) + 1):
            logits = lm_head(state).float()
            tokens = logits.argmax(-1)
            for n, i in enumerate(active):
                seq_id = seqs[plans[i][0]].seq_id
                params = samplers[seq_id].params
                if not params.greedy:
                    q = distribution(logits[n], params)
                    tokens[n] = race(q, samplers[seq_id].generator)
                    probs.setdefault(seq_id, []).append(q)
            drawn.append((active, tokens))
            keep = [n for n, i in enumerate(active) if plans[i][1] > j]
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                state, tokens = state[index], tokens[index]
                active = [active[n] for n in keep]
                tables_t, slots_t = None, slots_t[index]
            # chain: MTP input (its own hidden at position p, the draft at p + 2) goes at position p + 1
            chained = ForwardBatch.one_token_each(self.pools, [held[plans[i][0]] + j - 1 for i in active],
                                                  [row_tables[i] for i in active], slots_t, self.device, tables_t)
            state = mtp(embed(tokens), state, chained)
        values = torch.cat([t for _, t in drawn]).tolist()  # the one host transfer of all drafts
        proposed: dict[int, list[int]] = {seqs[r].seq_id: [] for r, _, _ in plans}
        at = 0
        for active_plans, _ in drawn:
            for i in active_plans:
                proposed[seqs[plans[i][0]].seq_id].append(values[at])
                at += 1
        for seq_id, q in probs.items():
            self.draft_probs[seq_id] = torch.stack(q)
        return proposed
