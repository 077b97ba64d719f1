"""Write an in-memory `Qwen3NextForCausalLM` as an HF-layout checkpoint (what `from_pretrained` and
transformers read back).

The model stacks each layer's routed experts (`mlp.experts.w13` = [gate_proj; up_proj] per expert,
`mlp.experts.w2` = down_proj); the checkpoint keeps one tensor per expert and projection. Every
other parameter name is already a checkpoint tensor name.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from .checkpoint import SINGLE_FILE, CheckpointReader, validate
from .config import Qwen3NextConfig
from .make_checkpoint import write_model_configs
from .moe import Experts
from .tokenizer import save_tokenizer

_STACKED = re.compile(r"^(?P<experts>(?:.+\.)?mlp\.experts)\.(?P<stack>w13|w2)$")


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every parameter of `model`, experts unstacked."""
    for name, param in model.named_parameters():
        match = _STACKED.match(name)
        if match is None:
            yield name, param.detach()
            continue
        experts: Experts = model.get_submodule(match["experts"])
        inter = experts.intermediate_size
        for row, expert in enumerate(experts.expert_ids):
            prefix = f"{match['experts']}.{expert}"
            if match["stack"] == "w13":
                yield f"{prefix}.gate_proj.weight", param.detach()[row, :inter]
                yield f"{prefix}.up_proj.weight", param.detach()[row, inter:]
            else:
                yield f"{prefix}.down_proj.weight", param.detach()[row]


def save_pretrained(model: torch.nn.Module, tokenizer: Tokenizer, out_dir: str | Path,
                    dtype: torch.dtype = torch.bfloat16) -> Qwen3NextConfig:
    """Write config, generation config, tokenizer and one `model.safetensors` in `dtype` into
    `out_dir`, then check that the files hold exactly the tensors the config needs (MTP included
    when the model has it). Returns the config as written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config: Qwen3NextConfig = model.config
    save_tokenizer(tokenizer, out_dir, config.max_position_embeddings)
    config = write_model_configs(out_dir, config, tokenizer, dtype)
    # copies: a loaded model's packed projections share storage (model/packed.py), which safetensors refuses
    tensors = {name: t.to(device="cpu", dtype=dtype, copy=True).contiguous() for name, t in checkpoint_tensors(model)}
    save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    validate(CheckpointReader(out_dir), config, allow_missing_mtp=getattr(model, "mtp", None) is None)
    return config
