"""Byte-level BPE tokenizer for test and benchmark checkpoints.

The tokenizer is trained on the built-in corpus (`tokenizer_corpus.CORPUS`), so a checkpoint can be
made on a machine with no network. Byte-level means every one of the 256 byte values is a token, so
any UTF-8 text (emoji, CJK, code) encodes and decodes exactly, whatever the corpus contained.

Files written (the layout transformers' `AutoTokenizer` reads):
  tokenizer.json         the `tokenizers` model: vocab, merges, pre-tokenizer, decoder, special tokens
  tokenizer_config.json  which tokens are eos / pad, the tokenizer class name, and Qwen's ChatML
                         chat template (`chat_template.CHATML_TEMPLATE`)
"""
from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .tokenizer_corpus import CORPUS

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Trained first, so they get ids 0, 1, 2 in every vocabulary size.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def train_tokenizer(vocab_size: int, texts: Iterable[str] | None = None) -> Tokenizer:
    """Train byte-level BPE up to `vocab_size` tokens (fewer if the text runs out of merges: the
    built-in corpus yields ~4.1k at most). `texts` is the training text, one document per item
    (default: the built-in corpus; the trained model uses its training corpus, see `model.corpus`).
    Deterministic: the same texts and vocab_size give the same `tokenizer.json` bytes in every process."""
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} < {minimum} (3 special tokens + 256 byte tokens)")
    tokenizer = Tokenizer(models.BPE())
    # GPT-2 style: split on the word regex, map bytes to printable unicode, never add a prefix space
    # (so decode(encode(text)) == text with no stripping).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] if texts is None else texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir`."""
    from .chat_template import CHATML_TEMPLATE  # imports this module's token names

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TOKENIZER_FILE).write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-character table used by the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TextTokenizer:
    """The serving-side view of a checkpoint's tokenizer.

    Decoding goes through each token's raw bytes (not the library decoder) so that `decode` and the
    incremental detokenizer agree byte for byte: both are `bytes.decode("utf-8", "replace")` of the
    concatenated token bytes.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token: str = ENDOFTEXT):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos_token_id = tokenizer.token_to_id(eos_token)
        if eos_token_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")
        self.eos_token_id: int = eos_token_id
        self.special_token_ids = frozenset(
            tokenizer.token_to_id(t) for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is not None
        )
        byte_of = _byte_decoder()
        self._token_bytes: list[bytes] = []
        for token_id in range(self.vocab_size):
            token = tokenizer.id_to_token(token_id)
            if token_id in self.special_token_ids:
                self._token_bytes.append(token.encode("utf-8"))
            else:
                self._token_bytes.append(bytes(byte_of[c] for c in token))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in the text become their special ids."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for (possibly a fragment of one character).

        Ids past the tokenizer's vocabulary are padding rows of the embedding (real checkpoints pad
        the vocab to a round size too): the model can still emit them, and they decode to nothing."""
        if token_id < 0:
            raise ValueError(f"token id {token_id} is negative")
        return self._token_bytes[token_id] if token_id < self.vocab_size else b""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        data = b"".join(
            self.token_bytes(i) for i in ids if not (skip_special_tokens and i in self.special_token_ids)
        )
        return data.decode("utf-8", errors="replace")

    def incremental_detokenizer(self, skip_special_tokens: bool = False) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into printable text deltas for streaming.

    A token may end in the middle of a multi-byte character (byte-level BPE splits emoji and CJK);
    those bytes are held back until the character completes, so a delta is never a broken character.
    The concatenation of every `step` result and `flush()` equals `decode(all_ids)`.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._consumed = 0  # how many ids of the sequence have been turned into bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, ids: list[int]) -> str:
        """`ids` is the whole sequence so far (it only ever grows); returns the new printable text."""
        if len(ids) < self._consumed:
            raise ValueError(f"ids shrank from {self._consumed} to {len(ids)}: one detokenizer per sequence")
        new_ids = ids[self._consumed:]
        self._consumed = len(ids)
        skip = self._tokenizer.special_token_ids if self._skip_special else ()
        data = b"".join(self._tokenizer.token_bytes(i) for i in new_ids if i not in skip)
        return self._utf8.decode(data, final=False)

    def flush(self) -> str:
        """Call at the end of the sequence: held-back bytes of an unfinished character become U+FFFD."""
        return self._utf8.decode(b"", final=True)


def write_tokenizer(out_dir: str | Path, vocab_size: int, model_max_length: int) -> Tokenizer:
    """Train and save; returns the trained tokenizer (its size may be below `vocab_size`)."""
    tokenizer = train_tokenizer(vocab_size)
    save_tokenizer(tokenizer, out_dir, model_max_length)
    return tokenizer


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load the tokenizer of a checkpoint directory (or a `tokenizer.json` path)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}")
    eos_token = ENDOFTEXT
    config_file = file.parent / TOKENIZER_CONFIG_FILE
    if config_file.exists():
        eos_token = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token") or ENDOFTEXT
        if isinstance(eos_token, dict):  # older transformers wrote AddedToken dicts
            eos_token = eos_token["content"]
    return TextTokenizer(Tokenizer.from_file(str(file)), eos_token=eos_token)


def load_tokenizer_if_present(path: str | Path) -> TextTokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer.json (a checkpoint saved by
    transformers' save_pretrained holds weights and config only): token ids in and out need none."""
    path = Path(path)
    if path.is_dir() and not (path / TOKENIZER_FILE).exists():
        return None
    return load_tokenizer(path)
