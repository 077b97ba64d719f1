import hashlib
import os
import subprocess
import sys

import pytest

from nextserve.model.tokenizer import (
    ENDOFTEXT, IM_END, IM_START, load_tokenizer, train_tokenizer,
)

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog.\n\tIndented, with  double spaces!",
    "emoji": "Launch 🚀 done ✅ family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽",
    "cjk": "你好，世界。日本語のテキスト。한국어 문장입니다.",
    "mixed": "def f(x):\n    return x ** 2  # 平方 😀\nprice: 9.99€, naïve café, Ω≈π, \x00\x7f end",
    "leading_space": "  starts with spaces and ends with a newline\n",
    "specials": f"{IM_START}user\nhi{IM_END}{ENDOFTEXT}",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip_is_exact(tokenizer, name):
    text = TEXTS[name]
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.eos_token_id == 0
    assert tokenizer.encode(ENDOFTEXT) == [0]
    assert tokenizer.encode(IM_START) == [1]
    assert tokenizer.encode(IM_END) == [2]
    ids = tokenizer.encode(TEXTS["specials"])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_bpe_merges_common_english(tokenizer):
    text = "The library closed at six, but the reading room stayed open late."
    assert len(tokenizer.encode(text)) < 0.6 * len(text.encode())  # 512 tokens: ~250 merges
    larger = train_tokenizer(4096)
    assert len(larger.encode(text).ids) < 0.3 * len(text.encode())


def _stream(tokenizer, ids):
    detok = tokenizer.incremental_detokenizer()
    deltas = [detok.step(ids[: n + 1]) for n in range(len(ids))]
    return deltas, detok.flush()


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_incremental_detokenizer_concatenates_to_text(tokenizer, name):
    text = TEXTS[name]
    deltas, tail = _stream(tokenizer, tokenizer.encode(text))
    assert "".join(deltas) + tail == text
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas), "a delta contained a broken character"


def _single_byte_tokens(tokenizer) -> dict[int, int]:
    """byte value -> the id of the token that is exactly that byte (all 256 exist)."""
    table = {}
    for i in range(tokenizer.vocab_size):
        if i not in tokenizer.special_token_ids and len(tokenizer.token_bytes(i)) == 1:
            table[tokenizer.token_bytes(i)[0]] = i
    assert len(table) == 256
    return table


def test_incremental_detokenizer_holds_back_partial_characters(tokenizer):
    # Single byte tokens: the 4-byte rocket must come out whole, on its last byte.
    by_byte = _single_byte_tokens(tokenizer)
    ids = [by_byte[ord("a")], by_byte[ord("b")]] + [by_byte[b] for b in "🚀".encode()]
    deltas, tail = _stream(tokenizer, ids)
    assert deltas == ["a", "b", "", "", "", "🚀"]
    assert tail == ""


def test_incremental_detokenizer_agrees_with_decode_on_invalid_utf8(tokenizer):
    by_byte = _single_byte_tokens(tokenizer)
    # a stray continuation byte, a valid "é", then a 3-byte lead cut off at the end of the sequence
    ids = [by_byte[0x80], by_byte[0xC3], by_byte[0xA9], by_byte[0xE4], by_byte[0xBD]]
    deltas, tail = _stream(tokenizer, ids)
    assert tokenizer.decode(ids) == "\ufffdé\ufffd"
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert tail == "\ufffd"  # the unfinished character surfaces only at flush


def test_incremental_detokenizer_rejects_a_shrinking_sequence(tokenizer):
    detok = tokenizer.incremental_detokenizer()
    detok.step([5, 6, 7])
    with pytest.raises(ValueError, match="shrank"):
        detok.step([5])


def test_training_reaches_preset_vocab_sizes():
    assert train_tokenizer(512).get_vocab_size() == 512
    assert train_tokenizer(4096).get_vocab_size() == 4096


def test_checkpoint_tokenizer_is_the_trained_one(tiny_checkpoint):
    written = (tiny_checkpoint / "tokenizer.json").read_text(encoding="utf-8")
    assert written == train_tokenizer(512).to_str(pretty=True)


def test_training_is_deterministic_across_processes():
    # Different hash seeds change Python and Rust hash-map iteration orders; the output must not move.
    code = (
        "import hashlib; from nextserve.model.tokenizer import train_tokenizer; "
        "print(hashlib.sha256(train_tokenizer(1024).to_str().encode()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True,
                       text=True, check=True).stdout.strip()
        for seed in ("1", "2")
    }
    local = hashlib.sha256(train_tokenizer(1024).to_str().encode()).hexdigest()
    assert digests == {local}
