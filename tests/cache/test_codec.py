"""The value format: a bit-exact round trip of the model's real cache tensors, and a miss with its reason
for every way a stored value can fail to be the one its key names."""
import pytest
import torch

from nextserve.model.presets import config_from_preset
from nextserve.router.cache import codec
from nextserve.router.cache.codec import MissReason, Unusable
from nextserve.router.cache.keys import CacheNamespace, chain_keys
from nextserve.router.cache.layout import KV, NEXT_TOKEN, STATE, ModelLayout

TOKENS = list(range(1000, 1200))  # 3 full blocks and an 8-token tail


@pytest.fixture
def layout() -> ModelLayout:
    return ModelLayout.from_config(config_from_preset("tiny"), "bfloat16")


@pytest.fixture
def keys(namespace):
    return chain_keys(namespace, TOKENS, partial_tail=True)


def read(namespace, kind, key, value: codec.EncodedValue, expected=None, parts=None):
    header = codec.read_header(value.head, namespace, kind, key)
    return codec.decode(header, [b for _, b in value.parts] if parts is None else parts, expected=expected)


def assert_bit_exact(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype and actual[name].shape == expected[name].shape, name
        # bytes, not values: a round trip must not even change a NaN's payload or the sign of a zero
        assert torch.equal(actual[name].contiguous().view(torch.uint8), expected[name].contiguous().view(torch.uint8)), name


def test_layout_of_the_tiny_model_names_every_deltanet_and_attention_layer(layout):
    config = config_from_preset("tiny")
    state, kv = layout.state(), layout.kv(64)
    linear = [i for i, t in enumerate(config.layer_types) if t == "linear_attention"]
    attention = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    assert linear and attention
    assert set(state) == {f"layers.{i}.{n}" for i in linear for n in ("conv", "recurrent")}
    assert state[f"layers.{linear[0]}.recurrent"] == ("float32", (config.linear_num_value_heads,
                                                                  config.linear_key_head_dim, config.linear_value_head_dim))
    assert state[f"layers.{linear[0]}.conv"] == ("bfloat16", (config.linear_conv_dim, config.linear_conv_kernel_dim - 1))
    assert kv[f"layers.{attention[0]}.key"] == ("bfloat16", (64, config.num_key_value_heads, config.head_dim))
    with_mtp = ModelLayout.from_config(config, "bfloat16", with_mtp=True)
    assert set(with_mtp.kv(64)) - set(kv) == {f"layers.{config.num_hidden_layers}.{n}" for n in ("key", "value")} \
        | {NEXT_TOKEN}
    assert with_mtp.kv(64)[NEXT_TOKEN] == ("int64", (1,))  # the token the head's last row paired with
    assert with_mtp.state() == state  # the MTP head is attention only


@pytest.mark.parametrize("inline_bytes, part_bytes", [(2**30, 2**30), (0, 1000), (0, 777)], ids=["inline", "parts", "odd-parts"])
def test_round_trip_is_bit_exact(namespace, keys, layout, tensors_like, inline_bytes, part_bytes):
    for kind, key in [(STATE, keys[1]), (KV, keys[1]), (KV, keys[3])]:  # keys[3] is the 8-token tail
        expected = layout.expected(kind, key.num_tokens)
        tensors = tensors_like(expected)
        value = codec.encode(namespace, kind, key, tensors, inline_bytes=inline_bytes, part_bytes=part_bytes,
                             expected=expected)
        assert (len(value.parts) > 1) == (inline_bytes == 0)
        assert all(len(b) <= part_bytes for _, b in value.parts)
        assert_bit_exact(read(namespace, kind, key, value, expected), tensors)


@pytest.fixture
def stored(namespace, keys, layout, tensors_like):
    """A split state value at keys[1] and its tensors."""
    tensors = tensors_like(layout.state())
    return codec.encode(namespace, STATE, keys[1], tensors, inline_bytes=0, part_bytes=4096), tensors


def reason_of(fn) -> MissReason:
    with pytest.raises(Unusable) as e:
        fn()
    return e.value.reason


def test_a_missing_value_is_absent(namespace, keys):
    assert reason_of(lambda: codec.read_header(None, namespace, STATE, keys[0])) == MissReason.ABSENT


def test_another_format_version_is_a_version_miss(namespace, keys, stored):
    newer = CacheNamespace(namespace.fingerprint, namespace.dtype, format_version=2)
    value = codec.encode(newer, STATE, keys[1], stored[1])
    assert reason_of(lambda: codec.read_header(value.head, namespace, STATE, keys[1])) == MissReason.VERSION


@pytest.mark.parametrize("other", [CacheNamespace("fedcba9876543210", "bfloat16"),
                                   lambda ns: CacheNamespace(ns.fingerprint, "float16")], ids=["checkpoint", "dtype"])
def test_a_value_written_for_another_checkpoint_or_dtype_is_a_fingerprint_miss(namespace, keys, stored, other):
    other = other(namespace) if callable(other) else other
    value = codec.encode(other, STATE, keys[1], stored[1])
    assert reason_of(lambda: codec.read_header(value.head, namespace, STATE, keys[1])) == MissReason.FINGERPRINT


def test_a_value_of_another_key_or_kind_is_a_key_miss(namespace, keys, stored):
    value, _ = stored
    assert reason_of(lambda: codec.read_header(value.head, namespace, STATE, keys[2])) == MissReason.KEY
    assert reason_of(lambda: codec.read_header(value.head, namespace, KV, keys[1])) == MissReason.KEY


def test_a_flipped_byte_in_the_header_or_a_part_is_a_checksum_miss(namespace, keys, stored):
    value, _ = stored
    head = bytearray(value.head)
    head[20] ^= 0x01
    assert reason_of(lambda: codec.read_header(bytes(head), namespace, STATE, keys[1])) == MissReason.CHECKSUM
    parts = [b for _, b in value.parts]
    parts[1] = parts[1][:100] + bytes([parts[1][100] ^ 0x80]) + parts[1][101:]
    assert reason_of(lambda: read(namespace, STATE, keys[1], value, parts=parts)) == MissReason.CHECKSUM


def test_a_flipped_byte_in_an_inline_payload_is_a_checksum_miss(namespace, keys, stored):
    value = codec.encode(namespace, STATE, keys[1], stored[1])
    head = bytearray(value.head)
    head[-10] ^= 0x01
    header = codec.read_header(bytes(head), namespace, STATE, keys[1])
    assert reason_of(lambda: codec.decode(header)) == MissReason.CHECKSUM


def test_truncated_heads_and_parts_are_truncated_misses(namespace, keys, stored):
    value, _ = stored
    for cut in (6, 40, len(value.head) - 1):
        assert reason_of(lambda: codec.read_header(value.head[:cut], namespace, STATE, keys[1])) == MissReason.TRUNCATED
    inline = codec.encode(namespace, STATE, keys[1], stored[1])
    assert reason_of(lambda: codec.read_header(inline.head[:-1], namespace, STATE, keys[1])) == MissReason.TRUNCATED
    parts = [b for _, b in value.parts]
    parts[-1] = parts[-1][:-3]
    assert reason_of(lambda: read(namespace, STATE, keys[1], value, parts=parts)) == MissReason.TRUNCATED


def test_a_missing_part_is_a_missing_part_miss(namespace, keys, stored):
    value, _ = stored
    parts = [b for _, b in value.parts]
    parts[2] = None
    assert reason_of(lambda: read(namespace, STATE, keys[1], value, parts=parts)) == MissReason.MISSING_PART
    assert reason_of(lambda: read(namespace, STATE, keys[1], value, parts=parts[:2])) == MissReason.MISSING_PART


def test_bytes_that_are_no_cache_value_are_malformed(namespace, keys):
    assert reason_of(lambda: codec.read_header(b"hello world, not a value", namespace, KV, keys[0])) == MissReason.MALFORMED


def test_a_value_in_another_layout_is_a_layout_miss(namespace, keys, layout, tensors_like):
    wrong = tensors_like({n: (d, (s[0], s[1] + 1) if len(s) == 2 else s) for n, (d, s) in layout.state().items()})
    value = codec.encode(namespace, STATE, keys[1], wrong)  # what a buggy or other-config writer might store
    assert reason_of(lambda: read(namespace, STATE, keys[1], value, expected=layout.state())) == MissReason.LAYOUT
    with pytest.raises(ValueError, match="layout"):
        codec.encode(namespace, STATE, keys[1], wrong, expected=layout.state())
