import json
import subprocess
import sys

import pytest
import torch

from nextserve.model import Qwen3NextForCausalLM, Sampler, SamplingParams, generate
from nextserve.model.sampling import apply_penalties, filter_top_k_top_p


def logits_row(seed=0, vocab=50):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    row = logits_row()
    assert Sampler(SamplingParams(temperature=0))(row, [], []) == int(row.argmax())


def test_same_seed_same_tokens_and_different_seed_differs():
    row = logits_row(vocab=1000)
    draws = lambda seed: [Sampler(SamplingParams(seed=seed))(row, [], []) for _ in range(1)]  # noqa: E731
    a = Sampler(SamplingParams(seed=5))
    b = Sampler(SamplingParams(seed=5))
    seq_a = [a(row, [], []) for _ in range(20)]
    assert seq_a == [b(row, [], []) for _ in range(20)]
    c = Sampler(SamplingParams(seed=6))
    assert seq_a != [c(row, [], []) for _ in range(20)]
    assert draws(1) == draws(1)


def test_sampling_follows_the_distribution():
    row = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    s = Sampler(SamplingParams(seed=0))
    n, p = 3000, torch.tensor([0.7, 0.2, 0.1])
    counts = torch.bincount(torch.tensor([s(row, [], []) for _ in range(n)]), minlength=3).float() / n
    # each frequency within 4 standard deviations of a binomial proportion (a biased sampler is far off)
    assert ((counts - p).abs() <= 4 * (p * (1 - p) / n).sqrt()).all(), counts


def test_top_k_and_top_p_keep_only_the_head():
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_top_k_top_p(row, 2, 1.0)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_top_k_top_p(row, 0, 0.75)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_top_k_top_p(row, 0, 0.5)).tolist() == [True, False, False, False]
    s = Sampler(SamplingParams(top_k=1, seed=3))
    assert {s(row, [], []) for _ in range(50)} == {0}


def test_penalties():
    row = torch.tensor([2.0, -1.0, 0.5, 0.0])
    rep = apply_penalties(row, [0], [1], SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [1.0, -2.0, 0.5, 0.0]  # positive logits shrink, negative grow more negative
    pres = apply_penalties(row, [0], [2, 2, 3], SamplingParams(presence_penalty=1.0, frequency_penalty=0.5))
    assert pres.tolist() == [2.0, -1.0, 0.5 - 1.0 - 1.0, 0.0 - 1.0 - 0.5]  # prompt tokens untouched


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(temperature=float("nan")), "temperature"),
])
def test_bad_sampling_values_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def test_stop_tokens_and_length_finish(model):
    [free] = generate(model, [[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert free.finish_reason == "length" and len(free.output_ids) == 8
    stop = free.output_ids[3]
    [stopped] = generate(model, [[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop,),
                                                            ignore_eos=True))
    assert stopped.finish_reason == "stop"
    assert stopped.output_ids == free.output_ids[:free.output_ids.index(stop) + 1]


def test_seeded_batch_generation_is_reproducible_and_independent_of_batch(model):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
    alone = generate(model, [[1, 2, 3]], params)[0].output_ids
    together = generate(model, [[9, 9, 9, 9, 9], [1, 2, 3]], params)[1].output_ids
    assert alone == together


def test_bad_prompts_are_rejected(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        generate(model, [[1, model.config.vocab_size]], SamplingParams())


def test_cli_generate_json_matches_in_process(model, tiny_checkpoint):
    out = subprocess.run([sys.executable, "-m", "nextserve.cli", "generate", "--checkpoint", str(tiny_checkpoint),
                          "--prompt-ids", "5,6,7", "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    [expected] = generate(model, [[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert result["token_ids"] == expected.output_ids and result["finish_reason"] == "length"


def test_cli_generate_streams_text_and_reports_bad_flags(tiny_checkpoint):
    ok = subprocess.run([sys.executable, "-m", "nextserve.cli", "generate", "--checkpoint", str(tiny_checkpoint),
                         "--max-tokens", "5", "--temperature", "0", "hello"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "nextserve.cli", "generate", "--checkpoint", str(tiny_checkpoint),
                          "--top-p", "0", "hello"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "top_p" in bad.stderr


BATCH_PARAMS = [
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.3, presence_penalty=0.5),
    dict(temperature=0.8, seed=1),
    dict(temperature=1.2, top_k=7, seed=2),
    dict(temperature=0.7, top_p=0.8, seed=3),
    dict(temperature=1.0, top_k=20, top_p=0.6, repetition_penalty=1.5, frequency_penalty=0.4, seed=4),
    dict(temperature=0.9, presence_penalty=-0.7, seed=5),
    dict(temperature=1.0, top_k=1000, seed=6),  # k beyond the vocabulary: no cut
]


def test_batch_sampling_equals_per_sequence_sampling_for_the_same_seeds():
    from nextserve.model.sampling import sample_batch
    vocab, g = 300, torch.Generator().manual_seed(0)
    histories = [([int(t) for t in torch.randint(0, vocab, (n,), generator=g)],
                  [int(t) for t in torch.randint(0, vocab, (m,), generator=g)])
                 for n, m in zip([5, 1, 9, 3, 12, 7, 4, 2], [0, 6, 3, 0, 8, 11, 5, 1])]
    alone = [Sampler(SamplingParams(**p)) for p in BATCH_PARAMS]
    together = [Sampler(SamplingParams(**p)) for p in BATCH_PARAMS]
    for step in range(25):
        logits = torch.randn(len(BATCH_PARAMS), vocab, generator=g) * 3
        expected = [s(logits[i], *histories[i]) for i, s in enumerate(alone)]
        assert sample_batch(logits, together, histories) == expected, f"step {step}"
        for h, t in zip(histories, expected):
            h[1].append(t)
    assert len({tuple(h[1][-25:]) for h in histories[2:]}) > 1  # the sampled rows really sampled


def test_batch_sampling_of_greedy_rows_is_argmax():
    from nextserve.model.sampling import sample_batch
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    samplers = [Sampler(SamplingParams(temperature=0)) for _ in range(4)]
    assert sample_batch(logits, samplers, [([], [])] * 4) == logits.argmax(-1).tolist()
