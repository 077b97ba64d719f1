"""Train a small Qwen3-Next (MTP head included) on the standard library's sources.

Plain torch autograd over the model's reference path (`train_objective`), AdamW with linear warmup
and a cosine decay, gradient clipping, a seeded sampler of random training windows, and a fixed set
of validation windows. `OUT/` becomes an HF-layout checkpoint (bf16 `model.safetensors`, config,
ChatML tokenizer) plus two training files that are not part of the checkpoint:

  train-state.pt   fp32 weights, optimizer moments, sampler RNG, step: `--resume` continues from it
                   and produces exactly the losses an uninterrupted run would
  training.json    what was trained on what (corpus digest, Python version), losses, timings
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .config import Qwen3NextConfig
from .corpus import CorpusFiles, find_corpus, token_stream
from .generate import generate
from .make_checkpoint import init_tensor
from .presets import config_from_preset
from .qwen3_next import Qwen3NextForCausalLM
from .sampling import SamplingParams
from .save import save_pretrained
from .tokenizer import ENDOFTEXT, TOKENIZER_FILE, TextTokenizer, train_tokenizer
from .train_objective import Losses, check_trainable, compute_losses

STATE_FILE = "train-state.pt"
REPORT_FILE = "training.json"
# Each evaluation also decodes these greedily: the loss says how much was learnt, samples say what.
SAMPLE_PROMPTS = ("import ", "def ", "class ")
SAMPLE_TOKENS = 48


@dataclass(slots=True)
class TrainConfig:
    # 2000 steps x 8 x 256 tokens = 4.1M tokens, about half an epoch of the 3.11 stdlib's 8.4M:
    # about an hour on 2 CPU cores (docs/training.md has the measurement)
    steps: int = 2000
    batch_size: int = 8
    seq_len: int = 256              # positions per window that both losses score
    lr: float = 3e-3
    min_lr_ratio: float = 0.1       # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1       # on matrices only; norms, gates' biases and decays are not shrunk
    grad_clip: float = 1.0
    mtp_weight: float = 0.3         # DeepSeek-V3's weight for the MTP loss over most of its run
    router_weight: float = 0.001    # the config's router_aux_loss_coef
    seed: int = 0
    eval_every: int = 250
    eval_windows: int = 32
    save_every: int = 250

    def __post_init__(self):
        assert self.steps >= 1 and self.batch_size >= 1 and self.seq_len >= 1
        assert 0 <= self.warmup_steps < self.steps or self.steps == 1, "warmup must end before the last step"
        assert self.lr > 0 and 0 <= self.min_lr_ratio <= 1
        assert self.eval_every >= 1 and self.save_every >= 1 and self.eval_windows >= 1

    def lr_at(self, step: int) -> float:
        """Linear warmup over `warmup_steps`, then cosine from lr to lr * min_lr_ratio at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - 1 - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # per step: step, loss, mtp, router, lr
    evals: list[dict] = field(default_factory=list)    # per evaluation: step, val_loss, val_mtp, samples


# --- the model ------------------------------------------------------------------------------------

def init_weights(model: Qwen3NextForCausalLM, generator: torch.Generator) -> None:
    """GPT-2-style init for training: matrices N(0, 0.02), the projections that write into the
    residual stream scaled down by sqrt(2 * layers) so its variance stays O(1) with depth; norms at
    identity; DeltaNet decays, time steps and conv taps as the random checkpoints draw them."""
    depth = model.config.num_hidden_layers + 1  # the MTP layer adds to a residual stream too
    for name, param in model.named_parameters():
        if name.endswith(("A_log", "dt_bias", "conv1d.weight")):
            value = init_tensor(name, tuple(param.shape), generator)
        elif name.endswith("linear_attn.norm.weight"):
            value = torch.ones(param.shape)
        elif param.dim() == 1:
            value = torch.zeros(param.shape)  # zero-centred RMSNorm: scale 1 + w
        else:
            std = 0.02
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.w2")):
                std /= math.sqrt(2 * depth)
            value = torch.randn(param.shape, generator=generator) * std
        with torch.no_grad():
            param.copy_(value)


def _decays(name: str, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and not name.endswith("conv1d.weight")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if _decays(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if not _decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# --- data -----------------------------------------------------------------------------------------

@dataclass
class Corpus:
    files: CorpusFiles
    tokenizer: Tokenizer
    train: torch.Tensor       # [N] int64 token stream
    validation: torch.Tensor  # [M] int64


def prepare_corpus(root: str | Path | None, vocab_size: int, tokenizer: Tokenizer | None) -> Corpus:
    """Find the files, train the tokenizer on the training split (unless given), tokenize both splits."""
    files = find_corpus(root)
    train_texts = files.texts("train")
    if tokenizer is None:
        tokenizer = train_tokenizer(vocab_size, train_texts)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model {vocab_size}: "
                         "the corpus is too small for this vocabulary (choose a smaller vocab_size)")

    def encode(texts):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    eos = tokenizer.token_to_id(ENDOFTEXT)
    return Corpus(files, tokenizer, token_stream(train_texts, encode, eos),
                  token_stream(files.texts("validation"), encode, eos))


def sample_windows(stream: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch_size, length] windows at uniformly random offsets of `stream`."""
    if stream.numel() < length + 1:
        raise ValueError(f"the token stream ({stream.numel()} tokens) is shorter than one window ({length})")
    starts = torch.randint(0, stream.numel() - length + 1, (batch_size,), generator=generator)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def validation_windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """Up to `count` windows evenly spread over the validation stream: the same every evaluation."""
    if stream.numel() < length:
        raise ValueError(f"the validation stream ({stream.numel()} tokens) is shorter than one window ({length})")
    last = stream.numel() - length
    starts = sorted({round(i * last / max(1, count - 1)) for i in range(count)})
    return torch.stack([stream[s:s + length] for s in starts])


@torch.no_grad()
def evaluate(model: Qwen3NextForCausalLM, windows: torch.Tensor, batch_size: int) -> dict:
    main = mtp = 0.0
    for chunk in windows.split(batch_size):
        losses = compute_losses(model, chunk)
        main += losses.main.item() * len(chunk)
        mtp += losses.mtp.item() * len(chunk)
    return {"val_loss": main / len(windows), "val_mtp": mtp / len(windows)}


def greedy_samples(model: Qwen3NextForCausalLM, tokenizer: Tokenizer) -> dict[str, str]:
    """prompt -> prompt + its greedy continuation (SAMPLE_TOKENS tokens at most, or to end-of-text)."""
    text = TextTokenizer(tokenizer)
    prompts = [text.encode(p) for p in SAMPLE_PROMPTS]
    done = generate(model, prompts, SamplingParams(max_tokens=SAMPLE_TOKENS, temperature=0),
                    eos_token_id=text.eos_token_id)
    return {p: p + text.decode(c.output_ids) for p, c in zip(SAMPLE_PROMPTS, done)}


# --- the run ----------------------------------------------------------------------------------------

def _config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def train(out_dir: str | Path, *, preset: str | Qwen3NextConfig = "stdlib", cfg: TrainConfig | None = None,
          corpus_dir: str | Path | None = None, resume: bool = False, stop_after: int | None = None,
          device: str = "cpu", progress: bool = True) -> TrainResult:
    """Train into `out_dir` (see the module docstring). `stop_after` ends this invocation after that many
    steps (state saved; `resume=True` continues). Returns the loss history of every step so far."""
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    device = torch.device(device)
    state_file = out_dir / STATE_FILE
    if resume and not state_file.exists():
        raise FileNotFoundError(f"nothing to resume: {state_file} does not exist")
    if not resume and state_file.exists():
        raise FileExistsError(f"{out_dir} already holds a training run ({STATE_FILE}); "
                              "pass resume=True (--resume) to continue it, or choose another output directory")

    saved = torch.load(state_file, map_location="cpu", weights_only=False) if resume else None
    if saved is not None:
        if saved["train_config"] != _config_dict(cfg):
            changed = {k: (saved["train_config"].get(k), v) for k, v in _config_dict(cfg).items()
                       if saved["train_config"].get(k) != v}
            raise ValueError(f"--resume with different training settings (saved, given): {changed}")
        config = Qwen3NextConfig.from_dict(saved["model_config"])
        tokenizer = Tokenizer.from_file(str(out_dir / TOKENIZER_FILE))
    requested = config_from_preset(preset) if isinstance(preset, str) else preset
    if saved is None:
        config, tokenizer = requested, None
    elif requested.to_dict() != saved["model_config"]:
        raise ValueError("--resume with a different model shape (--preset) than the run was started with")
    began = time.perf_counter()
    corpus = prepare_corpus(corpus_dir, config.vocab_size, tokenizer)
    tqdm.write(f"corpus {corpus.files.root}: {len(corpus.files.train)} training files ({corpus.train.numel():,} "
               f"tokens), {len(corpus.files.validation)} validation files ({corpus.validation.numel():,} tokens); "
               f"prepared in {time.perf_counter() - began:.0f} s")
    if saved is not None and saved["corpus_digest"] != corpus.files.digest:
        raise ValueError("the corpus differs from the one this run started on (another Python version or "
                         "corpus directory): resume it where it began, or start a new run")

    torch.manual_seed(cfg.seed)
    model = Qwen3NextForCausalLM(config, with_mtp=True).to(device)
    check_trainable(model, device)
    optimizer = make_optimizer(model, cfg)
    sampler = torch.Generator().manual_seed(cfg.seed)
    result, start, elapsed = TrainResult(), 0, 0.0
    if saved is None:
        init_weights(model, torch.Generator().manual_seed(cfg.seed))
    else:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        sampler.set_state(saved["sampler"])
        result = TrainResult(saved["history"], saved["evals"])
        start, elapsed = saved["step"], saved["elapsed_s"]
    val_windows = validation_windows(corpus.validation, cfg.eval_windows, cfg.seq_len + 2).to(device)

    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="training", disable=not progress)
    model.train()
    for step in range(start, end):
        began = time.perf_counter()
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        windows = sample_windows(corpus.train, cfg.batch_size, cfg.seq_len + 2, sampler).to(device)
        losses: Losses = compute_losses(model, windows)
        optimizer.zero_grad(set_to_none=True)
        losses.total(cfg.mtp_weight, cfg.router_weight).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        elapsed += time.perf_counter() - began
        record = {"step": step + 1, "loss": losses.main.item(), "mtp": losses.mtp.item(),
                  "router": losses.router.item(), "lr": lr}
        result.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", mtp=f"{record['mtp']:.3f}", lr=f"{lr:.1e}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            result.evals.append({"step": done, **evaluate(model, val_windows, cfg.batch_size),
                                 "samples": greedy_samples(model, corpus.tokenizer)})
            bar.write(f"step {done}: validation loss {result.evals[-1]['val_loss']:.4f}, "
                      f"MTP {result.evals[-1]['val_mtp']:.4f}")
        if done % cfg.save_every == 0 or done == end:
            _save(out_dir, model, corpus, cfg, result, done, elapsed, optimizer, sampler)
    bar.close()
    return result


def _save(out_dir: Path, model, corpus: Corpus, cfg: TrainConfig, result: TrainResult, step: int,
          elapsed: float, optimizer, sampler: torch.Generator) -> None:
    """Write the bf16 checkpoint, the training report, and (last, atomically) the resumable state."""
    save_pretrained(model, corpus.tokenizer, out_dir, dtype=torch.bfloat16)
    report = {
        "step": step,
        "train_config": _config_dict(cfg),
        "corpus": {"root": str(corpus.files.root), "python": platform.python_version(),
                   "license": "PSF-2.0 (Python Software Foundation License)",
                   "train_files": len(corpus.files.train), "validation_files": len(corpus.files.validation),
                   "train_tokens": corpus.train.numel(), "validation_tokens": corpus.validation.numel(),
                   "digest": corpus.files.digest},
        "train_seconds": round(elapsed, 1),
        "steps_per_second": round(step / elapsed, 4) if elapsed else None,
        "evals": result.evals,
        "last_losses": result.history[-1] if result.history else None,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    state = {"step": step, "elapsed_s": elapsed, "train_config": _config_dict(cfg),
             "model_config": model.config.to_dict(), "corpus_digest": corpus.files.digest,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "sampler": sampler.get_state(),
             "history": result.history, "evals": result.evals}
    partial = out_dir / (STATE_FILE + ".partial")
    torch.save(state, partial)
    partial.replace(out_dir / STATE_FILE)
