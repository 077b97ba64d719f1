"""Chat templates render here exactly as transformers' apply_chat_template renders them."""
import json
import shutil

import pytest
from transformers import AutoTokenizer

from nextserve.model.chat_template import (
    CHAT_TEMPLATE_FILE, ChatTemplateError, generation_stop_ids, load_chat_template,
)
from nextserve.model.tokenizer import IM_END, load_tokenizer

CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "Hello"}],
    "system_and_user": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "Name a prime above 10."}],
    "multi_turn_unicode": [{"role": "system", "content": "Réponds en français 🇫🇷"},
                           {"role": "user", "content": "你好\n  indented\tline"},
                           {"role": "assistant", "content": "Bonjour !"},
                           {"role": "user", "content": "Encore, avec \"quotes\" et {braces}"}],
    "empty_content": [{"role": "user", "content": ""}],
    "ends_with_assistant": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
}

# A template that exercises what transformers' environment adds beyond plain Jinja: loop controls,
# the non-ASCII tojson filter, special-token variables, trim_blocks / lstrip_blocks whitespace.
FANCY_TEMPLATE = """{{ bos_token or '' }}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    [{{ loop.index }}] {{ m | tojson }}
{% endfor %}
{% if add_generation_prompt %}>>{{ eos_token }}{% endif %}"""


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen_prompt", "no_gen_prompt"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chatml_equals_transformers(tiny_checkpoint, hf_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = load_chat_template(tiny_checkpoint).render(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    # and the token ids the router feeds equal transformers' tokenized template
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert load_tokenizer(tiny_checkpoint).encode(ours) == list(ids)


def test_chat_template_file_wins_and_matches_transformers(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / CHAT_TEMPLATE_FILE).write_text(FANCY_TEMPLATE, encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(checkpoint)
    for messages in CONVERSATIONS.values():
        ours = load_chat_template(checkpoint).render(messages, add_generation_prompt=True)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "<|im_start|>" not in ours  # the file's template, not tokenizer_config.json's


def test_unknown_role_is_rejected_by_the_template(tiny_checkpoint):
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        load_chat_template(tiny_checkpoint).render([{"role": "tool", "content": "x"}])


def test_no_template_and_named_templates(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    source = config.pop("chat_template")
    config_file.write_text(json.dumps(config))
    assert load_chat_template(checkpoint) is None
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}]
    config_file.write_text(json.dumps(config))
    assert load_chat_template(checkpoint).render(CONVERSATIONS["one_user_turn"]) == \
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_generated_checkpoint_stops_on_im_end(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    assert set(generation_stop_ids(tiny_checkpoint)) == {tokenizer.eos_token_id, tokenizer.encode(IM_END)[0]}
