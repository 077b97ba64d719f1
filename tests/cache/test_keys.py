"""Content keys: stable across processes, namespaced, and a chain (a prefix's keys are a prefix of the keys)."""
import json
import os
import subprocess
import sys

import pytest

from nextserve.router.cache.keys import BLOCK_TOKENS, CacheNamespace, chain_keys

FINGERPRINT = "0123456789abcdef"
TOKENS = [(i * 7919) % 151936 for i in range(300)]  # 4 full blocks and a 44-token tail


def test_keys_end_at_block_boundaries_and_a_partial_tail_is_keyed_only_on_request():
    ns = CacheNamespace(FINGERPRINT, "bfloat16")
    full = chain_keys(ns, TOKENS)
    assert [k.position for k in full] == [64, 128, 192, 256]
    assert all(k.is_full_block and k.num_tokens == BLOCK_TOKENS for k in full)
    tail = chain_keys(ns, TOKENS, partial_tail=True)
    assert tail[:4] == full and tail[4].position == 300 and tail[4].num_tokens == 44 and not tail[4].is_full_block
    assert chain_keys(ns, TOKENS[:60]) == [] and [k.position for k in chain_keys(ns, TOKENS[:60], partial_tail=True)] == [60]
    assert chain_keys(ns, TOKENS[:256], partial_tail=True) == full


def test_keys_are_the_same_in_another_process_with_another_hash_seed():
    ns = CacheNamespace(FINGERPRINT, "float32")
    here = [(k.position, k.hex) for k in chain_keys(ns, TOKENS, partial_tail=True)]
    script = ("import json, sys; from nextserve.router.cache.keys import CacheNamespace, chain_keys; "
              "assert 'torch' not in sys.modules, 'the keys must stay torch-free'; "
              "tokens = json.loads(sys.argv[1]); "
              f"print(json.dumps([(k.position, k.hex) for k in chain_keys(CacheNamespace({FINGERPRINT!r}, 'float32'), "
              "tokens, partial_tail=True)]))")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(TOKENS)], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=60)
    assert [tuple(x) for x in json.loads(out.stdout)] == here


@pytest.mark.parametrize("other", [
    CacheNamespace("fedcba9876543210", "bfloat16"),      # another checkpoint
    CacheNamespace(FINGERPRINT, "float32"),              # the same weights served in another dtype
    CacheNamespace(FINGERPRINT, "bfloat16", format_version=2),
    CacheNamespace(FINGERPRINT, "bfloat16", mtp=True),   # KV blocks that hold the MTP head's layer too
], ids=["fingerprint", "dtype", "format", "mtp"])
def test_another_namespace_gives_other_keys_everywhere(other):
    ns = CacheNamespace(FINGERPRINT, "bfloat16")
    ours, theirs = chain_keys(ns, TOKENS, partial_tail=True), chain_keys(other, TOKENS, partial_tail=True)
    assert not {k.digest for k in ours} & {k.digest for k in theirs}
    assert ns.redis_prefix != other.redis_prefix


def test_a_prefix_has_the_prefix_of_the_keys_and_a_changed_token_changes_its_block_and_all_after():
    ns = CacheNamespace(FINGERPRINT, "bfloat16")
    keys = chain_keys(ns, TOKENS)
    assert chain_keys(ns, TOKENS[:130]) == keys[:2]
    changed = list(TOKENS)
    changed[150] += 1  # inside block 2
    other = chain_keys(ns, changed)
    assert other[:2] == keys[:2]
    assert all(a.digest != b.digest for a, b in zip(other[2:], keys[2:]))
    # a tail is not the full block that begins with it
    assert chain_keys(ns, TOKENS[:63], partial_tail=True)[0].digest != keys[0].digest


def test_bad_namespace_and_token_ids_are_refused_with_the_reason():
    assert CacheNamespace(FINGERPRINT, "torch.bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="fingerprint"):
        CacheNamespace("not hex!", "bfloat16")
    with pytest.raises(ValueError, match="dtype"):
        CacheNamespace(FINGERPRINT, "int8")
    ns = CacheNamespace(FINGERPRINT, "bfloat16")
    with pytest.raises(ValueError, match="token id -1"):
        chain_keys(ns, [-1] * 64)
    with pytest.raises(ValueError, match="token id"):
        chain_keys(ns, [2**32] * 64)
