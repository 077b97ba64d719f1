"""Turning logits into tokens: penalties, temperature, top-k, top-p, seeded sampling.

Semantics follow vLLM (what OpenAI-style clients expect): the repetition penalty looks at prompt
and output, presence and frequency penalties at the output only; temperature 0 is greedy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0        # 0 = greedy
    top_k: int = 0                  # 0 = all tokens
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0    # subtracted once from tokens already generated
    frequency_penalty: float = 0.0   # subtracted per occurrence in the output
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None          # same seed, same prompt, same tokens
    speculative_tokens: int | None = None  # MTP drafts per step for this request: 0 off, 1..4; None: the server's

    def __post_init__(self):
        problems = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.speculative_tokens is not None and not 0 <= self.speculative_tokens <= 4:
            problems.append(f"speculative_tokens must be in 0..4 (0 turns it off), got {self.speculative_tokens}")
        if problems:
            raise ValueError("; ".join(problems))
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
                    params: SamplingParams) -> torch.Tensor:
    """logits: [V] fp32 for one sequence; returns penalised logits (a new tensor)."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[0]).float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


class Sampler:
    """Samples one sequence's tokens; holds its random generator so a seed reproduces a run."""

    def __init__(self, params: SamplingParams, device="cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> int:
        p = self.params
        logits = apply_penalties(logits.float(), prompt_ids, output_ids, p)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
        probs = logits.softmax(-1)
        # The exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, with no host sync
        # inside torch.multinomial and a per-sequence generator.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        return int(torch.argmax(probs / noise))


def sample_batch(logits: torch.Tensor, samplers: list[Sampler], histories: list[tuple[list[int], list[int]]]) -> list[int]:
    """One token per row of `logits` [N, V] (fp32), each by its own sampler's parameters and generator:
    the same tokens as `samplers[i](logits[i], *histories[i])` row by row, in one vectorised pass and
    one device-to-host transfer. histories[i] = (prompt_ids, output_ids) of row i."""
    N, V = logits.shape
    device = logits.device
    params = [s.params for s in samplers]
    logits = _penalise_batch(logits.float(), params, histories)
    greedy_ids = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return greedy_ids.tolist()

    rows = torch.tensor(sampled, device=device)
    x = logits[rows] / torch.tensor([params[i].temperature for i in sampled], device=device)[:, None]
    top_k = torch.tensor([params[i].top_k if 0 < params[i].top_k < V else V for i in sampled], device=device)
    top_p = torch.tensor([params[i].top_p for i in sampled], device=device)
    sorted_x = x.sort(-1, descending=True).values
    kth = sorted_x.gather(1, (top_k - 1)[:, None])
    x = x.masked_fill((x < kth) & (top_k < V)[:, None], float("-inf"))
    if bool((top_p < 1).any()):  # host check of host-made params only: no device sync
        sorted_x, order = x.sort(-1, descending=True)
        p_sorted = sorted_x.softmax(-1)
        drop = ((p_sorted.cumsum(-1) - p_sorted) >= top_p[:, None]) & (top_p < 1)[:, None]
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = x.softmax(-1)
    # The exponential race (see Sampler), one generator per row so a seed reproduces a run in any batch.
    noise = torch.empty_like(probs)
    for row, i in enumerate(sampled):
        noise[row].exponential_(generator=samplers[i].generator)
    tokens = greedy_ids.index_put((rows,), (probs / noise).argmax(-1))
    return tokens.tolist()


def _penalise_batch(logits: torch.Tensor, params: list[SamplingParams],
                    histories: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """apply_penalties for every row that asks for one, with one scatter per kind of penalty."""
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and (histories[i][0] or histories[i][1])]
    count_rows = [i for i, p in enumerate(params) if histories[i][1] and (p.presence_penalty or p.frequency_penalty)]
    if not rep_rows and not count_rows:
        return logits
    logits = logits.clone()
    N, V = logits.shape
    device = logits.device
    if rep_rows:
        row_ids = [i for i in rep_rows for _ in range(len(histories[i][0]) + len(histories[i][1]))]
        token_ids = [t for i in rep_rows for t in (*histories[i][0], *histories[i][1])]
        seen = torch.zeros(N, V, dtype=torch.bool, device=device)
        seen[torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if count_rows:
        row_ids = [i for i in count_rows for _ in histories[i][1]]
        token_ids = [t for i in count_rows for t in histories[i][1]]
        counts = torch.zeros(N, V, device=device)
        counts.index_put_((torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)),
                          torch.ones(len(token_ids), device=device), accumulate=True)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        logits = logits - (frequency * counts + presence * (counts > 0).float())
    return logits
