"""Write a randomly initialised Qwen3-Next checkpoint in the exact Hugging Face layout.

Output directory:
  config.json, generation_config.json      HF configs (transformers loads them as is)
  tokenizer.json, tokenizer_config.json    byte-level BPE trained on the built-in corpus
  model.safetensors                        or model-0000k-of-0000N.safetensors + model.safetensors.index.json

Same preset + seed + dtype + shard size => byte-identical files: tensors come from one seeded
torch.Generator in a fixed order, safetensors metadata holds a single key, and JSON is written in a
fixed key order.

The init is chosen so that the random model is numerically *interesting*, not just finite: every
matrix is N(0, 1/fan_in) so each sublayer's output is O(1) against an O(1) residual stream, norms
are perturbed away from identity, and DeltaNet decays span fast and slow heads. Logits come out with
a standard deviation of order 1, so greedy decoding and top-k routing both depend on the input.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import INDEX_FILE, SINGLE_FILE, expected_tensors, resolve_dtype
from .config import Qwen3NextConfig
from .presets import config_from_preset
from .tokenizer import ENDOFTEXT, IM_END, write_tokenizer

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(size: int | str) -> int:
    """Bytes in "10MB" (10**6 units, as transformers counts), "512MiB" (2**20), "4GB", or an int."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 10MB, 512MiB, 2GB or a byte count")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def init_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A float32 tensor for checkpoint tensor `name`, drawn from `generator`."""
    def randn():
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def uniform(low, high):
        return torch.rand(shape, generator=generator, dtype=torch.float32) * (high - low) + low

    if name.endswith("linear_attn.norm.weight"):
        return 1.0 + 0.1 * randn()  # gated RMSNorm multiplies by w directly: centre on 1
    if name.endswith("norm.weight") or "pre_fc_norm" in name:
        return 0.1 * randn()  # zero-centred RMSNorm multiplies by (1 + w): centre on 0
    if name.endswith("A_log"):
        return torch.log(uniform(1.0, 16.0))  # decay rates A in [1, 16], as in Mamba2 / Qwen3-Next
    if name.endswith("dt_bias"):
        # softplus(dt_bias) = dt with dt log-uniform in [1e-3, 1e-1]: per-head decays exp(-A*dt) span
        # near 1 (long memory) to ~0.2 (short memory).
        dt = torch.exp(uniform(math.log(1e-3), math.log(1e-1)))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if name.endswith("conv1d.weight"):
        return randn() / math.sqrt(shape[-1])  # depthwise: fan-in is the kernel width
    if name == "model.embed_tokens.weight":
        return randn()  # O(1) residual stream from the first layer on
    if len(shape) == 2:
        return randn() / math.sqrt(shape[1])  # N(0, 1/fan_in): O(1) outputs for O(1) inputs
    raise ValueError(f"no init rule for tensor {name!r} of shape {shape}")


def _plan_shards(sizes: dict[str, int], max_shard_size: int | None) -> list[list[str]]:
    """Split names (in order) into shards of at most `max_shard_size` bytes; a tensor larger than
    the limit gets a shard of its own."""
    if max_shard_size is None:
        return [list(sizes)]
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_model_configs(out_dir: Path, config: Qwen3NextConfig, tokenizer, torch_dtype: torch.dtype) -> Qwen3NextConfig:
    """Write config.json and generation_config.json for weights of `torch_dtype`, and remove the
    weight files of any earlier write. Returns the config as written."""
    # Special-token ids are the written tokenizer's, whatever the preset says (80b-a3b names Qwen's).
    eos = tokenizer.token_to_id(ENDOFTEXT)
    config = dataclasses.replace(config, bos_token_id=None, eos_token_id=eos, torch_dtype=_DTYPE_NAMES[torch_dtype])
    config_dict = config.to_dict()
    config_dict["pad_token_id"] = eos
    _write_json(out_dir / "config.json", config_dict)
    # Chat models stop on <|im_end|> as well as on end-of-text, as Qwen's instruct checkpoints do.
    stop_ids = [eos, tokenizer.token_to_id(IM_END)]
    _write_json(out_dir / "generation_config.json", {"eos_token_id": stop_ids, "pad_token_id": eos})

    for old in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:
        old.unlink(missing_ok=True)  # stale shards of an earlier write would shadow or confuse readers
    return config


def make_checkpoint(
    out_dir: str | Path,
    preset: str | Qwen3NextConfig,
    seed: int = 0,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype | str = "float32",
    progress: bool = True,
) -> Qwen3NextConfig:
    """Write a random checkpoint for `preset` (a name from `presets.PRESETS` or a config) into
    `out_dir`, replacing any weights already there. Returns the config as written (its eos token and
    dtype filled in from the tokenizer and `dtype`)."""
    config = config_from_preset(preset) if isinstance(preset, str) else preset
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype not in _DTYPE_NAMES:
        raise ValueError(f"checkpoints are written in float32, bfloat16 or float16, not {dtype!r}")
    shard_limit = parse_size(max_shard_size) if max_shard_size is not None else None  # fail before writing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = write_tokenizer(out_dir, config.vocab_size, config.max_position_embeddings)
    # The tokenizer may have fewer tokens than the config's vocab (the corpus yields ~4.1k at most);
    # the extra embedding rows are valid ids that the tokenizer simply never produces.
    config = write_model_configs(out_dir, config, tokenizer, torch_dtype)

    shapes = expected_tensors(config)
    element_size = torch.empty((), dtype=torch_dtype).element_size()
    sizes = {name: math.prod(shape) * element_size for name, shape in shapes.items()}
    shards = _plan_shards(sizes, shard_limit)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=f"writing {out_dir.name}",
               disable=not progress)
    for k, names in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors[name] = init_tensor(name, shapes[name], generator).to(torch_dtype).contiguous()
            weight_map[name] = file
            bar.update(sizes[name])
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
    bar.close()
    if len(shards) > 1:
        _write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    return config
