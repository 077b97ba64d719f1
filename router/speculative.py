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
  4. the MTP head runs over every position the sequence now holds that it has not seen (its own
     attention layer keeps KV like the main layers) and drafts token 1; tokens 2..k chain the MTP
     layer on its own output, one position at a time (as vLLM and SGLang run a one-layer MTP).
Drafts fit in the blocks the sequence holds and within its token limits; how many a sequence gets
is `router.acceptance`'s rule. Requests with penalties do not speculate (a penalty at a draft
position would depend on the drafts before it).
"""
from __future__ import annotations

import itertools

import torch

from nextserve.kernels.paging import BLOCK_SIZE
from nextserve.model.qwen3_next import Qwen3NextForCausalLM
from nextserve.model.sampling import Sampler, SamplingParams, filter_top_k_top_p, sample_batch
from nextserve.model.spec_states import keep_state_at
from nextserve.model.state import CachePools, ForwardBatch

from .acceptance import AcceptanceTracker, SpeculativeConfig
from .scheduler import ScheduledBatch


def can_speculate(params: SamplingParams) -> bool:
    return (params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampler's distribution over the vocabulary for logits [..., V] (no penalties): temperature,
    top-k, top-p. Greedy has no distribution: callers take the argmax instead."""
    rows = logits.reshape(-1, logits.shape[-1]).float() / params.temperature
    return torch.stack([filter_top_k_top_p(r, params.top_k, params.top_p).softmax(-1) for r in rows]).view_as(logits)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V] (the exponential race, as `Sampler` draws)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise))


def accept_greedy(target_logits: torch.Tensor, drafts: list[int]) -> list[int]:
    """target_logits [k + 1, V]: the model's logits at the pending token and each draft. Returns the
    accepted drafts and one token more: exactly what k + 1 greedy decode steps would produce."""
    best = target_logits.argmax(-1).tolist()
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
    """The runner's step when speculation is on. Holds each sequence's acceptance tracker and the
    distributions its pending drafts were drawn from."""

    def __init__(self, model: Qwen3NextForCausalLM, pools: CachePools, config: SpeculativeConfig, device):
        if model.mtp is None:
            raise ValueError("speculative decoding drafts with the MTP head: load the model with with_mtp=True "
                             "(a checkpoint with mtp.* tensors)")
        self.model, self.pools, self.config, self.device = model, pools, config, device
        self.trackers: dict[int, AcceptanceTracker] = {}
        self.draft_probs: dict[int, torch.Tensor] = {}

    def add(self, seq_id: int, params: SamplingParams) -> None:
        tracker = AcceptanceTracker(self.config, params.speculative_tokens)
        tracker.off = tracker.off or not can_speculate(params)
        self.trackers[seq_id] = tracker

    def free(self, seq_id: int) -> None:
        self.trackers.pop(seq_id, None)
        self.draft_probs.pop(seq_id, None)

    def step(self, batch: ScheduledBatch, samplers: dict[int, Sampler]) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """(seq_id -> new tokens, seq_id -> drafts for the next step)."""
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
        forward = ForwardBatch.build(self.pools, [s.num_computed for s in seqs], counts, tables, slots,
                                     self.device, keep_states_rows=m)
        hidden = self.model.model(ids, forward)
        spans = forward.spans
        # logits at every position of a verified row, at the last position of any other sampling row
        picks = [list(range(a, b)) if d else [b - 1] for (a, b), d, s in zip(spans, drafts, samples) if d or s]
        logits = self.model.lm_head(hidden[[i for p in picks for i in p]]).float()

        new_tokens: dict[int, list[int]] = {}
        kept: dict[int, int] = {}
        plain_rows, plain_logits, start = [], [], 0
        for r, (seq, d) in enumerate(zip(seqs, drafts)):
            if not (d or samples[r]):
                continue
            width = len(d) + 1 if d else 1
            row_logits = logits[start:start + width]
            start += width
            if not d:
                plain_rows.append(r)
                plain_logits.append(row_logits[0])
                continue
            sampler = samplers[seq.seq_id]
            if sampler.params.greedy:
                tokens = accept_greedy(row_logits, d)
            else:
                tokens = accept_sampled(row_logits, d, self.draft_probs[seq.seq_id], sampler.params,
                                        sampler.generator)
            self.trackers[seq.seq_id].record(len(d), len(tokens) - 1)
            if len(tokens) - 1 < len(d):
                kept[r] = len(tokens) - 1
            new_tokens[seq.seq_id] = tokens
        if plain_rows:
            sampled = sample_batch(torch.stack(plain_logits), [samplers[seqs[r].seq_id] for r in plain_rows],
                                   [(seqs[r].prompt_ids, seqs[r].output_ids) for r in plain_rows])
            for r, t in zip(plain_rows, sampled):
                new_tokens[seqs[r].seq_id] = [t]
        keep_state_at(forward, slots, kept)
        return new_tokens, self._draft(seqs, rows, drafts, counts, tables, slots, spans, hidden, new_tokens, samplers)

    def _draft(self, seqs, rows, drafts, counts, tables, slots, spans, hidden, new_tokens, samplers) -> dict[int, list[int]]:
        """Run the MTP head over the positions each speculating sequence now holds and draft its next
        tokens. Returns seq_id -> drafts (none for sequences that do not speculate now)."""
        mtp_rows = [r for r, s in enumerate(seqs) if not self.trackers[s.seq_id].off]
        if not mtp_rows:
            return {}
        lengths, follow, picked = [], [], []
        for r in mtp_rows:
            seq, tokens = seqs[r], new_tokens.get(seqs[r].seq_id)
            # The positions it holds after this step, each with the token that follows it.
            if drafts[r]:  # verified: the pending token and the accepted drafts, followed by the new tokens
                length, following = len(tokens), tokens
            elif tokens is not None:  # its last known token was fed: the sampled one follows it
                length, following = counts[r], rows[r][1:] + tokens
            else:  # a prompt chunk: the next prompt token follows it
                length, following = counts[r], seq.token_slice(counts[r] + 1)[1:]
            lengths.append(length)
            follow.extend(following)
            picked.extend(range(spans[r][0], spans[r][0] + length))
        batch = ForwardBatch.build(self.pools, [seqs[r].num_computed for r in mtp_rows], lengths,
                                   [tables[r] for r in mtp_rows], [slots[r] for r in mtp_rows], self.device)
        mtp = self.model.mtp
        embed = self.model.model.embed_tokens
        out = mtp(embed(torch.tensor(follow, dtype=torch.long, device=self.device)), hidden[picked], batch)

        # Who drafts, and how many: a sampled row, by its tracker, within its blocks and token limits.
        plans: list[tuple[int, int, int]] = []  # (index in mtp_rows, k, its length after this step)
        for n, (r, length) in enumerate(zip(mtp_rows, lengths)):
            seq = seqs[r]
            if seq.seq_id not in new_tokens:
                continue
            held = seq.num_computed + length  # the sequence's length once this step is applied
            # chained drafts write MTP keys up to position held + k - 2, in blocks it holds; the next
            # verification feeds held + k + 1 tokens in all, within what the request may ever hold
            room = min(len(tables[r]) * BLOCK_SIZE - held + 1,
                       seq.stop.max_fed_tokens(len(seq.prompt_ids)) - held - 1)
            k = min(self.trackers[seq.seq_id].next_k(), room)
            if k > 0:
                plans.append((n, k, held))
        if not plans:
            return {}
        last = list(itertools.accumulate(lengths))
        ends = [last[n] - 1 for n, _, _ in plans]
        state = out[ends]  # [P, H]: each drafting row's MTP hidden at its last held position
        proposed: dict[int, list[int]] = {seqs[mtp_rows[n]].seq_id: [] for n, _, _ in plans}
        probs: dict[int, list[torch.Tensor]] = {sid: [] for sid in proposed}
        active = list(range(len(plans)))
        for j in range(1, max(k for _, k, _ in plans) + 1):
            logits = self.model.lm_head(state).float()
            best = logits.argmax(-1).tolist()  # one transfer for every greedy row
            tokens = []
            for i, row_logits, t in zip(active, logits, best):
                seq_id = seqs[mtp_rows[plans[i][0]]].seq_id
                sampler = samplers[seq_id]
                if not sampler.params.greedy:
                    q = distribution(row_logits, sampler.params)
                    t = draw(q, sampler.generator)
                    probs[seq_id].append(q)
                proposed[seq_id].append(t)
                tokens.append(t)
            keep = [n for n, i in enumerate(active) if plans[i][1] > j]
            if not keep:
                break
            active = [active[n] for n in keep]
            # chain: MTP input (its own hidden at position p, the draft at p + 2) goes at position p + 1
            chained = ForwardBatch.build(self.pools, [plans[i][2] + j - 1 for i in active], [1] * len(active),
                                         [tables[mtp_rows[plans[i][0]]] for i in active],
                                         [slots[mtp_rows[plans[i][0]]] for i in active], self.device)
            step_ids = torch.tensor([tokens[n] for n in keep], dtype=torch.long, device=self.device)
            state = mtp(embed(step_ids), state[keep], chained)
        for seq_id, q in probs.items():
            if q:
                self.draft_probs[seq_id] = torch.stack(q)
        return proposed
