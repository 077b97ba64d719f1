"""Which tensors a cached value holds, by name, dtype and shape (torch-free).

Two kinds of value, stored under separate keys so that KV blocks alone can never count as a hit:

- a state snapshot (`kind="state"`) at position p: for every Gated DeltaNet layer i
  `layers.{i}.conv` [conv_dim, kernel - 1] (serving dtype) and `layers.{i}.recurrent` [Hv, K, V] (float32);
- a KV block (`kind="kv"`) ending at p: for every attention layer i `layers.{i}.key` and
  `layers.{i}.value` [n, Hkv, D] (serving dtype), n = the block's token count (64, or fewer for a
  partial tail). The KV of earlier blocks lives under the earlier keys of the chain. With the MTP
  head, its attention layer is one more, index num_hidden_layers (as the engine's pools number it),
  and `mtp.next_token` [1] (int64) is the token after the block that the head's last row was
  computed with (it lies outside the prefix the key names: a reader checks it against its own).

The layouts come from the model config, so a decoder can refuse a value whose tensors are not the
ones this model would restore (a miss with reason "layout"), whatever its header claims.
"""
from __future__ import annotations

from dataclasses import dataclass

STATE, KV = "state", "kv"
NEXT_TOKEN = "mtp.next_token"  # in a KV block with the MTP head: the token its last MTP row paired with
KINDS = (STATE, KV)

TensorSpec = tuple[str, tuple[int, ...]]  # (dtype name, shape)


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """The per-layer shapes of the model's cache; build it with `from_config`."""
    dtype: str
    linear_layers: tuple[int, ...]
    attention_layers: tuple[int, ...]
    conv_shape: tuple[int, int]             # [conv_dim, kernel - 1]
    recurrent_shape: tuple[int, int, int]   # [Hv, K, V]
    kv_head_shape: tuple[int, int]          # [Hkv, D]
    with_mtp: bool = False                  # the last attention layer is the MTP head's

    @classmethod
    def from_config(cls, config, dtype: str, *, with_mtp: bool = False) -> "ModelLayout":
        """`config` is a nextserve.model.config.Qwen3NextConfig; `dtype` the serving dtype name;
        `with_mtp` when the MTP head runs (its attention layer's KV is part of every block)."""
        types = list(config.layer_types)
        conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + \
            config.linear_num_value_heads * config.linear_value_head_dim
        return cls(
            dtype=str(dtype).removeprefix("torch."),
            linear_layers=tuple(i for i, t in enumerate(types) if t == "linear_attention"),
            attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
            + ((len(types),) if with_mtp else ()),
            conv_shape=(conv_dim, config.linear_conv_kernel_dim - 1),
            recurrent_shape=(config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim),
            kv_head_shape=(config.num_key_value_heads, config.head_dim),
            with_mtp=with_mtp,
        )

    def state(self) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for i in self.linear_layers:
            specs[f"layers.{i}.conv"] = (self.dtype, self.conv_shape)
            specs[f"layers.{i}.recurrent"] = ("float32", self.recurrent_shape)
        return specs

    def kv(self, num_tokens: int) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for i in self.attention_layers:
            for name in ("key", "value"):
                specs[f"layers.{i}.{name}"] = (self.dtype, (num_tokens, *self.kv_head_shape))
        if self.with_mtp:
            specs[NEXT_TOKEN] = ("int64", (1,))
        return specs

    def expected(self, kind: str, num_tokens: int) -> dict[str, TensorSpec]:
        if kind not in KINDS:
            raise ValueError(f"value kind {kind!r} is not one of {KINDS}")
        return self.state() if kind == STATE else self.kv(num_tokens)
