"""The trainer: a few steps on a tiny corpus learn (main and MTP losses fall), the checkpoint it writes
loads in transformers and in nextserve with equal logits, a resumed run continues exactly as an
uninterrupted one, and the tokenizer it trains round-trips text and carries ChatML."""
import json
import logging
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file

from nextserve.cli.main import main as cli_main
from nextserve.kernels.gated_delta_rule.naive import (naive_chunk_gated_delta_rule,
                                                      naive_recurrent_gated_delta_rule)
from nextserve.model import Qwen3NextForCausalLM, StaticCache
from nextserve.model.checkpoint import SINGLE_FILE
from nextserve.model.corpus import find_corpus, is_validation
from nextserve.model.presets import config_from_preset
from nextserve.model.tokenizer import ENDOFTEXT, IM_END, IM_START, load_tokenizer
from nextserve.model.tokenizer_corpus import CORPUS
from nextserve.model.train import REPORT_FILE, SAMPLE_PROMPTS, STATE_FILE, TrainConfig, init_weights, train
from nextserve.model.train_objective import compute_losses

VOCAB = 512  # the tiny preset's


WORDS = CORPUS.split()


def _module_source(i: int) -> str:
    """Small, regular Python modules (prose docstrings for a vocabulary's worth of merges): a tiny
    model learns their patterns in a few steps."""
    prose = " ".join(WORDS[40 * i: 40 * i + 40])
    lines = [f'"""Helpers for widget {i}.', "", prose, '"""', "import os", ""]
    for j in range(6):
        lines += [f"def compute_{j}_{i % 5}(value, scale={j + 1}):",
                  f'    """Return value times {j + 1}, less {i} past the limit."""',
                  "    result = value * scale",
                  f"    if result > {10 * (i + 1)}:",
                  f"        return result - {i}",
                  "    return result", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Module files named so that the path-hash split puts 3 of them in validation, 24 in training."""
    root = tmp_path_factory.mktemp("corpus")
    train_names, validation_names = [], []
    i = 0
    while len(train_names) < 24 or len(validation_names) < 3:
        name = f"pkg/mod_{i}.py"
        side = validation_names if is_validation(name) else train_names
        if len(side) < (3 if side is validation_names else 24):
            side.append(name)
            (root / "pkg").mkdir(exist_ok=True)
            (root / name).write_text(_module_source(i), encoding="utf-8")
        i += 1
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third_party.py").write_text("x = 1\n")  # never part of the corpus
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8: skipped
    return root


SETTINGS = dict(steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=6, eval_windows=4,
                save_every=6, seed=7)


@pytest.fixture(scope="module")
def run(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = train(out, preset="tiny", cfg=TrainConfig(**SETTINGS), corpus_dir=corpus_dir, progress=False)
    return out, result


def test_corpus_split_is_by_path_and_skips_what_is_not_stdlib_text(corpus_dir):
    files = find_corpus(corpus_dir)
    assert len(files.train) == 24 and len(files.validation) == 3
    assert not set(files.train) & set(files.validation)
    assert all(is_validation(n) for n in files.validation)
    assert not any("site-packages" in n or n == "latin1.py" for n in files.train + files.validation)
    assert find_corpus(corpus_dir).digest == files.digest


def test_every_parameter_gets_a_gradient_through_the_reference_path():
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config_from_preset("tiny"), with_mtp=True)
    init_weights(model, torch.Generator().manual_seed(0))
    windows = torch.randint(0, VOCAB, (3, 70))  # 68 positions: past one 64-token DeltaNet chunk
    compute_losses(model, windows).total(0.3, 0.001).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_chunked_delta_rule_backward_equals_the_recurrent_definition(rms_close):
    """Training backpropagates through the chunked (WY) form; its gradients must be those of the
    token-by-token recurrence it computes, on a length that is not a multiple of the chunk."""
    g = torch.Generator().manual_seed(1)
    T, Hk, Hv, K, V = 75, 2, 4, 16, 8
    q, k = (torch.randn(1, T, Hk, K, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, T, Hv, V, generator=g, requires_grad=True)
    gate = (-torch.rand(1, T, Hv, generator=g)).requires_grad_()
    beta = torch.rand(1, T, Hv, generator=g).requires_grad_()
    h0 = torch.randn(1, Hv, K, V, generator=g, requires_grad=True)
    weights = torch.randn(1, T, Hv, V, generator=g)
    grads = []
    for fn in (naive_recurrent_gated_delta_rule, naive_chunk_gated_delta_rule):
        o, final, _ = fn(q, k, v, gate, beta, initial_state=h0)
        ((o * weights).sum() + final.sum()).backward()
        grads.append([t.grad.clone() for t in (q, k, v, gate, beta, h0)])
        for t in (q, k, v, gate, beta, h0):
            t.grad = None
    # the forward's chain (the recurrence over T tokens, the l2 norms and the 64-wide chunk products),
    # walked once more backwards
    chain = 2 * (T + 2 * K + 2 * 64)
    for name, ref, got in zip("q k v g beta h0".split(), *grads):
        rms_close(got, ref, reduction=chain, what=f"d loss / d {name}")


def test_a_few_steps_reduce_both_losses(run):
    _, result = run
    losses = [h["loss"] for h in result.history]
    mtp = [h["mtp"] for h in result.history]
    assert len(losses) == SETTINGS["steps"]
    # the init predicts a nearly uniform distribution: both losses start at ln(vocab)
    assert abs(losses[0] - math.log(VOCAB)) < 0.1 and abs(mtp[0] - math.log(VOCAB)) < 0.1
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5
    assert sum(mtp[-3:]) / 3 < mtp[0] - 1.0
    assert [e["step"] for e in result.evals] == [6, 12]
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"] < math.log(VOCAB)
    assert result.evals[-1]["val_mtp"] < math.log(VOCAB)
    samples = result.evals[-1]["samples"]
    assert sorted(samples) == sorted(SAMPLE_PROMPTS)
    assert all(text.startswith(prompt) and len(text) > len(prompt) for prompt, text in samples.items())


def test_checkpoint_loads_in_transformers_without_weight_warnings_and_logits_agree(run, logits_close):
    out, _ = run
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        theirs, info = transformers.Qwen3NextForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                         output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])  # transformers drops the MTP layer
    words = ("missing", "newly initialized", "mismatch", "not initialized")
    assert not [m for m in messages if any(w in m.lower() for w in words)]

    stored = load_file(out / SINGLE_FILE)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert "mtp.fc.weight" in stored and "mtp.layers.0.mlp.experts.11.down_proj.weight" in stored
    ours = Qwen3NextForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_close(ours(ids), theirs.eval()(ids).logits, ours.config, ids.shape[1])


def test_checkpoint_holds_exactly_the_trained_weights_mtp_included(run, corpus_dir):
    """The model rebuilt from train-state.pt, rounded to bf16 as the checkpoint stores it, gives the
    same main and MTP losses, bit for bit, as the checkpoint loaded with its MTP head."""
    out, _ = run
    state = torch.load(out / STATE_FILE, weights_only=False)
    trained = Qwen3NextForCausalLM(config_from_preset("tiny"), with_mtp=True)
    trained.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in state["model"].items()})
    loaded = Qwen3NextForCausalLM.from_pretrained(out, dtype=torch.float32, with_mtp=True)
    windows = torch.randint(0, VOCAB, (2, 34), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = compute_losses(trained, windows), compute_losses(loaded, windows)
    assert torch.equal(a.main, b.main) and torch.equal(a.mtp, b.mtp)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["step"] == SETTINGS["steps"] and report["corpus"]["train_files"] == 24
    assert report["corpus"]["license"].startswith("PSF")


def test_the_mtp_loss_trains_the_draft_that_serving_computes(run, logits_close):
    """Training scores the MTP head exactly where serving drafts with it: the draft logits of
    `forward_batch` + `mtp_logits` (hidden at t, the token at t + 1) are the training forward's."""
    out, _ = run
    model = Qwen3NextForCausalLM.from_pretrained(out, dtype=torch.float32, with_mtp=True)
    S = 40
    ids = torch.randint(0, VOCAB, (S + 2,), generator=torch.Generator().manual_seed(2))
    batch = StaticCache(model, 1, S).batch([0], [S])
    _, hidden = model.forward_batch(ids[:S], batch, all_logits=True)
    drafts = model.mtp_logits(ids[1:S + 1], hidden, batch)
    with torch.no_grad():
        fresh = StaticCache(model, 1, S).batch([0], [S])
        trained_hidden = model.model(ids[:S], fresh)  # what compute_losses runs, unrolled
        training_drafts = model.lm_head(model.mtp(model.model.embed_tokens(ids[1:S + 1]), trained_hidden,
                                                  fresh)).float()
        mtp_loss = compute_losses(model, ids[None]).mtp
    assert torch.equal(torch.nn.functional.cross_entropy(training_drafts, ids[2:]), mtp_loss)
    logits_close(drafts, training_drafts, model.config, S, what="draft logits")


def test_resume_continues_exactly_as_an_uninterrupted_run(run, corpus_dir, tmp_path):
    out, result = run
    split = tmp_path / "split"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    common = ["train", "--out", str(split), "--preset", "tiny", "--corpus", str(corpus_dir), "--no-progress", *flags]
    assert cli_main([*common, "--stop-after", "5"]) == 0
    assert torch.load(split / STATE_FILE, weights_only=False)["step"] == 5
    assert cli_main(common) == 1  # refuses to start over an existing run
    assert cli_main([*common, "--resume", "--lr=0.02"]) == 1  # refuses changed settings
    assert cli_main([*common, "--resume", "--preset", "small"]) == 1  # and a changed model
    assert cli_main([*common, "--resume"]) == 0
    resumed = torch.load(split / STATE_FILE, weights_only=False)
    assert resumed["history"] == result.history and resumed["evals"] == result.evals
    assert load_file(split / SINGLE_FILE).keys() == load_file(out / SINGLE_FILE).keys()
    assert all(torch.equal(load_file(split / SINGLE_FILE)[k], t) for k, t in load_file(out / SINGLE_FILE).items())


def test_trained_tokenizer_round_trips_and_carries_chatml(run, corpus_dir):
    out, _ = run
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == VOCAB
    text = (corpus_dir / find_corpus(corpus_dir).validation[0]).read_text()
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text.encode()) / 2  # merges learnt on code
    assert [tokenizer.encode(t) for t in (ENDOFTEXT, IM_START, IM_END)] == [[0], [1], [2]]
    assert tokenizer.eos_token_id == 0

    hf = transformers.AutoTokenizer.from_pretrained(out)
    prompt = hf.apply_chat_template([{"role": "user", "content": "def f():"}], tokenize=False,
                                    add_generation_prompt=True)
    assert prompt == f"{IM_START}user\ndef f():{IM_END}\n{IM_START}assistant\n"
    assert hf(prompt)["input_ids"] == tokenizer.encode(prompt)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]  # stops on <|im_end|> as well as end-of-text
