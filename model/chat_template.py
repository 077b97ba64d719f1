"""Chat templates: a conversation -> the prompt text the model was trained on.

Rendered the way transformers' `apply_chat_template` renders them, so that a checkpoint's template
gives the same prompt here as there: a sandboxed Jinja2 environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, `raise_exception` and `strftime_now` globals, a
`tojson` filter that keeps non-ASCII characters, and the tokenizer's special tokens as variables.

Where the template comes from, first found wins (as transformers reads a checkpoint):
  chat_template.jinja                      a file of its own
  tokenizer_config.json  "chat_template"   a string, or a list of {"name", "template"} (the "default" one)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import IM_END, IM_START, TOKENIZER_CONFIG_FILE

CHAT_TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")

# Qwen's ChatML: every turn is <|im_start|>ROLE\nCONTENT<|im_end|>\n; the model answers after
# "<|im_start|>assistant\n" and ends its turn with <|im_end|>.
CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}\n"
    "    {%- endif %}\n"
    "    {{- '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '" + IM_START + "assistant\\n' }}\n"
    "{%- endif %}\n"
)


class ChatTemplateError(ValueError):
    """The template raised (raise_exception) or failed to render this conversation."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes HTML characters and ASCII-encodes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: dict[str, str | None]  # bos_token, eos_token, ... as the template sees them

    @cached_property
    def _compiled(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...]). Raises ChatTemplateError."""
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on this conversation: {e}") from e


def _token_content(token) -> str | None:
    return token["content"] if isinstance(token, dict) else token


def load_chat_template(checkpoint: str | Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none (then only raw prompts can be served)."""
    directory = Path(checkpoint)
    config_file = directory / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    special = {name: _token_content(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    file = directory / CHAT_TEMPLATE_FILE
    if file.exists():
        return ChatTemplate(file.read_text(encoding="utf-8"), special)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one serves chat
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return ChatTemplate(source, special) if isinstance(source, str) else None


def generation_stop_ids(checkpoint: str | Path) -> tuple[int, ...]:
    """The ids that end a generated turn: generation_config.json's eos_token_id (an id or a list; Qwen's
    chat checkpoints list <|im_end|> and end-of-text), empty when the file is absent."""
    file = Path(checkpoint) / "generation_config.json"
    if not file.exists():
        return ()
    eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]))
