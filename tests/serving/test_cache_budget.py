"""Sizing the pools from --kv-cache-memory: plain arithmetic, checked against the model's real shapes."""
import pytest

from nextserve.router.cache_budget import block_bytes, parse_cache_memory, size_pools, slot_bytes


@pytest.mark.parametrize("text, value", [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                         ("100000", 100000), ("0.5", 0.5), ("1", 1.0)])
def test_amounts_and_fractions_parse(text, value):
    got = parse_cache_memory(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["", "4 parsecs", "-1GiB", "0", "GiB", "0.0"])
def test_bad_amounts_say_what_is_expected(text):
    with pytest.raises(ValueError, match="kv-cache-memory"):
        parse_cache_memory(text)


def test_slots_first_up_to_the_running_limit_then_blocks():
    sizes = size_pools(budget=10_000, block_bytes=100, slot_bytes=1000, max_seqs=4)
    assert (sizes.num_slots, sizes.num_blocks) == (4, 60) and sizes.total_bytes <= 10_000
    sizes = size_pools(budget=2_300, block_bytes=100, slot_bytes=1000, max_seqs=4)
    assert (sizes.num_slots, sizes.num_blocks) == (2, 3)
    assert "3 blocks of 64 tokens (192 tokens)" in sizes.describe() and "2 sequences" in sizes.describe()
    with pytest.raises(ValueError, match="holds no sequence"):
        size_pools(budget=1_050, block_bytes=100, slot_bytes=1000, max_seqs=4)


def test_bytes_match_the_tensors_a_layer_keeps(tiny_checkpoint):
    from nextserve.model.checkpoint import load_config
    c = load_config(tiny_checkpoint)
    n_attn, n_linear = c.layer_types.count("full_attention"), c.layer_types.count("linear_attention")
    assert block_bytes(c, "bfloat16") == n_attn * 2 * 64 * c.num_key_value_heads * c.head_dim * 2
    assert block_bytes(c, "float32", num_extra_attention_layers=1) == (n_attn + 1) * 2 * 64 * 2 * 16 * 4
    conv = c.linear_conv_dim * (c.linear_conv_kernel_dim - 1) * 2
    recurrent = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4  # always fp32
    assert slot_bytes(c, "bfloat16") == n_linear * (conv + recurrent)
