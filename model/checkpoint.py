"""Reading Qwen3-Next checkpoints in the Hugging Face layout (safetensors, single file or sharded).

Tensors are memory-mapped and read one at a time, so a process pays only for what it asks for: an
expert worker loads its own experts (`expert_tensor_predicate`), the router everything else
(`dense_predicate`). Every way a checkpoint can be broken (missing file, truncated or garbage
safetensors, an index naming a missing shard, missing / unexpected / mis-shaped tensors) surfaces as
`CheckpointError` naming the file or tensors, never as a raw library exception or a crash.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from .config import Qwen3NextConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MTP_PREFIX = "mtp."
_SHOW = 5  # how many offending names an error message lists before "and N more"

# One routed expert's projection, stored per expert on disk: `<prefix>.mlp.experts.<e>.<proj>.weight`.
EXPERT_TENSOR = re.compile(
    r"^(?P<experts>(?:.+\.)?mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# safetensors header dtype codes -> bytes per element (for the truncation check).
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                  "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, is corrupt, or does not match its config."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`torch.bfloat16`, "bfloat16", "bf16", "torch.bfloat16" -> torch.bfloat16; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def load_config(path: str | Path) -> Qwen3NextConfig:
    """The `Qwen3NextConfig` of a checkpoint directory's `config.json`."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        return Qwen3NextConfig.from_dict(json.loads(file.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file (is {path} a checkpoint directory?)") from None
    except (json.JSONDecodeError, TypeError, AssertionError, ValueError) as e:
        raise CheckpointError(f"{file}: not a valid Qwen3-Next config: {e}") from e


# --- the expected layout ----------------------------------------------------------------------------

def _decoder_layer_tensors(config: Qwen3NextConfig, prefix: str, layer_type: str, moe: bool):
    c, H = config, config.hidden_size
    yield f"{prefix}.input_layernorm.weight", (H,)
    if layer_type == "linear_attention":
        nv, kd, vd = c.linear_num_value_heads, c.linear_key_dim, c.linear_value_dim
        yield f"{prefix}.linear_attn.in_proj_qkvz.weight", (2 * kd + 2 * vd, H)
        yield f"{prefix}.linear_attn.in_proj_ba.weight", (2 * nv, H)
        yield f"{prefix}.linear_attn.conv1d.weight", (c.linear_conv_dim, 1, c.linear_conv_kernel_dim)
        yield f"{prefix}.linear_attn.dt_bias", (nv,)
        yield f"{prefix}.linear_attn.A_log", (nv,)
        yield f"{prefix}.linear_attn.norm.weight", (c.linear_value_head_dim,)
        yield f"{prefix}.linear_attn.out_proj.weight", (H, vd)
    else:
        q, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        yield f"{prefix}.self_attn.q_proj.weight", (2 * q * d, H)  # query and output gate per head
        yield f"{prefix}.self_attn.k_proj.weight", (kv * d, H)
        yield f"{prefix}.self_attn.v_proj.weight", (kv * d, H)
        yield f"{prefix}.self_attn.o_proj.weight", (H, q * d)
        yield f"{prefix}.self_attn.q_norm.weight", (d,)
        yield f"{prefix}.self_attn.k_norm.weight", (d,)
    yield f"{prefix}.post_attention_layernorm.weight", (H,)
    if moe:
        E, I, S = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
        yield f"{prefix}.mlp.gate.weight", (E, H)
        for e in range(E):
            yield f"{prefix}.mlp.experts.{e}.gate_proj.weight", (I, H)
            yield f"{prefix}.mlp.experts.{e}.up_proj.weight", (I, H)
            yield f"{prefix}.mlp.experts.{e}.down_proj.weight", (H, I)
        yield f"{prefix}.mlp.shared_expert.gate_proj.weight", (S, H)
        yield f"{prefix}.mlp.shared_expert.up_proj.weight", (S, H)
        yield f"{prefix}.mlp.shared_expert.down_proj.weight", (H, S)
        yield f"{prefix}.mlp.shared_expert_gate.weight", (1, H)
    else:
        I = c.intermediate_size
        yield f"{prefix}.mlp.gate_proj.weight", (I, H)
        yield f"{prefix}.mlp.up_proj.weight", (I, H)
        yield f"{prefix}.mlp.down_proj.weight", (H, I)


def expected_tensors(config: Qwen3NextConfig, include_mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the HF layout -> its shape, in a fixed order (embeddings, layers in order,
    final norm, lm_head, then the `mtp.*` draft layers)."""
    c, H = config, config.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, H)}
    for i, layer_type in enumerate(c.layer_types):
        out.update(_decoder_layer_tensors(c, f"model.layers.{i}", layer_type, c.is_moe_layer(i)))
    out["model.norm.weight"] = (H,)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, H)
    if include_mtp and c.num_nextn_predict_layers > 0:
        # The draft head: fc(concat(norm_e(embed(token)), norm_h(hidden))) -> decoder layer -> norm.
        out["mtp.fc.weight"] = (H, 2 * H)
        out["mtp.pre_fc_norm_embedding.weight"] = (H,)
        out["mtp.pre_fc_norm_hidden.weight"] = (H,)
        for k in range(c.num_nextn_predict_layers):
            out.update(_decoder_layer_tensors(c, f"mtp.layers.{k}", "full_attention", c.num_experts > 0))
        out["mtp.norm.weight"] = (H,)
    return out


def parameter_counts(config: Qwen3NextConfig) -> dict[str, int]:
    """total, mtp (part of total), and active (per token, main model only: top-k of the routed experts)."""
    shapes = expected_tensors(config)
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(numel.values())
    mtp = sum(n for name, n in numel.items() if name.startswith(MTP_PREFIX))
    routed = sum(n for name, n in numel.items() if is_expert_tensor(name) and not name.startswith(MTP_PREFIX))
    active = total - mtp - routed
    if config.num_experts:
        active += routed * config.num_experts_per_tok // config.num_experts
    return {"total": total, "mtp": mtp, "active": active}


# --- predicates for selective loading ------------------------------------------------------------------

def is_expert_tensor(name: str) -> bool:
    """True for routed-expert weights (`...mlp.experts.{e}.*`), in the main model and in `mtp.`."""
    return EXPERT_TENSOR.match(name) is not None


def expert_tensor_predicate(expert_ids: Iterable[int]) -> Callable[[str], bool]:
    """Matches the routed-expert tensors of the given experts, in every layer (MTP included)."""
    wanted = frozenset(int(e) for e in expert_ids)

    def predicate(name: str) -> bool:
        match = EXPERT_TENSOR.match(name)
        return match is not None and int(match["expert"]) in wanted

    return predicate


def dense_predicate(name: str) -> bool:
    """Everything except routed experts: embeddings, mixers, norms, routers, shared experts, lm_head."""
    return not is_expert_tensor(name)


# --- the reader ----------------------------------------------------------------------------------------

def _read_header(file: Path) -> dict:
    """Parse and sanity-check a safetensors header ourselves, so a damaged file yields a message that
    says what is wrong with which file (the library's own errors are terse, and reading past the end
    of a truncated memory map can kill the process)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if size < 8:
                raise CheckpointError(f"{file}: {size} bytes, too short to be a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8:
                raise CheckpointError(
                    f"{file}: header length field says {header_len} bytes but the file has {size - 8} after it:"
                    " not a safetensors file, or truncated"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            expected = math.prod(info["shape"]) * _ELEMENT_BYTES.get(info["dtype"], 1)
            if info["dtype"] in _ELEMENT_BYTES and end - begin != expected:
                raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {info['shape']}")
            data_end = max(data_end, end)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header: {e}") from e
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{file}: truncated: the header describes {8 + header_len + data_end} bytes, the file has {size}"
        )
    header.pop("__metadata__", None)
    return header


class CheckpointReader:
    """Memory-mapped access to the tensors of a checkpoint directory.

    Accepts `model.safetensors` or `model.safetensors.index.json` + shards (the index is preferred
    only when there is no single file, as transformers does). Opening checks every file's header and
    that the index and the shards agree; tensor data is read only by `get` / `load`.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        self._file_of: dict[str, str] = {}
        self._info: dict[str, dict] = {}  # name -> {"dtype": "F32", "shape": [...], ...}
        self._handles: dict[str, object] = {}
        if path.is_file():  # a direct path to the single file or to the index
            single, index = (None, path) if path.suffix == ".json" else (path, None)
        else:
            single = path / SINGLE_FILE if (path / SINGLE_FILE).exists() else None
            index = path / INDEX_FILE if (path / INDEX_FILE).exists() else None
        if single is not None:
            self._open_single(single)
        elif index is not None:
            self._open_shards(index.parent, self._read_index(index))
        else:
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _read_index(self, index_file: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index: {e}") from e
        return weight_map

    def _open_shards(self, directory: Path, weight_map: dict[str, str]) -> None:
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        missing = [f for f in sorted(by_file) if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{directory / INDEX_FILE} maps tensors to shards that do not exist: "
                + ", ".join(f"{f} ({len(by_file[f])} tensors)" for f in missing)
            )
        for file, names in sorted(by_file.items()):
            header = self._open_file(directory / file)
            absent = [n for n in names if n not in header]
            if absent:
                raise CheckpointError(
                    f"{directory / file}: the index maps {len(absent)} tensors to this shard that it does not "
                    f"contain: {_listing(absent)}"
                )
            for name in names:
                self._file_of[name] = file
                self._info[name] = header[name]

    def _open_single(self, file: Path) -> None:
        header = self._open_file(file)
        for name, info in header.items():
            self._file_of[name] = file.name
            self._info[name] = info

    def _open_file(self, file: Path) -> dict:
        header = _read_header(file)
        try:
            self._handles[file.name] = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            raise CheckpointError(f"{file}: cannot open as safetensors: {e}") from e
        return header

    # -- listing --
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def __len__(self) -> int:
        return len(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._require(name)["shape"])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(info["shape"]) for name, info in self._info.items()}

    def file_of(self, name: str) -> str:
        self._require(name)
        return self._file_of[name]

    def files(self) -> list[str]:
        return sorted(self._handles)

    def _require(self, name: str) -> dict:
        if name not in self._info:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return self._info[name]

    # -- reading --
    def get(self, name: str, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
        """One tensor, converted to `dtype` (default: as stored) and moved to `device`."""
        self._require(name)
        try:
            tensor = self._handles[self._file_of[name]].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path / self._file_of[name]}: cannot read tensor {name!r}: {e}") from e
        dtype = resolve_dtype(dtype)
        return tensor.to(device=device, dtype=dtype if dtype is not None else tensor.dtype)

    def load(
        self,
        predicate: Callable[[str], bool] | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """The tensors whose names satisfy `predicate` (all when None), in storage order."""
        return {name: self.get(name, dtype, device) for name in self._file_of if predicate is None or predicate(name)}

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" (and {len(names) - _SHOW} more)" if len(names) > _SHOW else "")


def validate(
    reader: CheckpointReader,
    config: Qwen3NextConfig,
    predicate: Callable[[str], bool] | None = None,
    allow_missing_mtp: bool = True,
) -> int:
    """Check that the checkpoint holds exactly the tensors `config` needs, with the right shapes.

    `predicate` restricts the check to the names a process will load (a worker checks only its
    experts). MTP tensors may be absent when `allow_missing_mtp` (many exported checkpoints drop
    them), but if present they must be complete and well shaped. Returns the number of tensors
    checked; raises `CheckpointError` listing every missing, unexpected and mis-shaped tensor.
    """
    keep = predicate or (lambda name: True)
    expected = {n: s for n, s in expected_tensors(config).items() if keep(n)}
    actual = {n: s for n, s in reader.shapes().items() if keep(n)}
    missing = [n for n in expected if n not in actual]
    if allow_missing_mtp and not any(n.startswith(MTP_PREFIX) for n in actual):
        missing = [n for n in missing if not n.startswith(MTP_PREFIX)]
    unexpected = [n for n in actual if n not in expected]
    misshaped = [n for n in expected if n in actual and tuple(actual[n]) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {_listing(unexpected)}")
    if misshaped:
        details = [f"{n} expected {list(expected[n])} found {list(actual[n])}" for n in misshaped]
        problems.append(f"{len(misshaped)} tensors with wrong shapes: {_listing(details)}")
    if problems:
        raise CheckpointError(f"{reader.path} does not match its config:\n  " + "\n  ".join(problems))
    return len(actual)
