"""Qwen3-Next configuration: the fields of an HF `config.json` that the math depends on."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class Qwen3NextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    layer_types: list[str] = field(default_factory=list)  # derived from the interval when empty
    full_attention_interval: int = 4
    # gated attention
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    partial_rotary_factor: float = 0.25
    rope_theta: float = 1e7
    max_position_embeddings: int = 262144
    # Gated DeltaNet
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # sparse MoE
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    intermediate_size: int = 5120  # dense MLP width, used only by mlp_only_layers
    # the rest
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1  # multi-token-prediction layers stored under `mtp.`
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = [
                "full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        assert len(self.layer_types) == self.num_hidden_layers, "layer_types must name every layer"
        assert set(self.layer_types) <= {"full_attention", "linear_attention"}, self.layer_types
        assert self.linear_num_value_heads % self.linear_num_key_heads == 0
        assert self.num_attention_heads % self.num_key_value_heads == 0
        assert 0 < self.num_experts_per_tok <= self.num_experts
        assert self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim

    # Derived sizes, named as the papers and kernels name them.
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    # --- config.json ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict) -> "Qwen3NextConfig":
        raw = dict(raw)
        # transformers 5 keeps rope settings in `rope_parameters`; older configs have `rope_theta`.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if "rope_theta" in rope:
            raw.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            raw.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r}: only default RoPE is implemented")
        if isinstance(raw.get("eos_token_id"), list):
            raw["eos_token_id"] = raw["eos_token_id"][0]
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw["dtype"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Qwen3NextConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_dict(json.loads(file.read_text()))

    def to_dict(self) -> dict:
        """The HF `config.json` of this model (transformers 5 layout, loadable by transformers 4 too)."""
        d = dataclasses.asdict(self)
        d.pop("torch_dtype")
        d.update(
            architectures=["Qwen3NextForCausalLM"],
            model_type="qwen3_next",
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            initializer_range=0.02,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
            use_cache=True,
            dtype=self.torch_dtype,
            rope_theta=self.rope_theta,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
        )
        return d
