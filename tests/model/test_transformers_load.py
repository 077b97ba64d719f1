"""The checkpoints we write must be real Qwen3-Next checkpoints: transformers (the numerical oracle)
loads them with every weight in place."""
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen3NextForCausalLM

from nextserve.model.checkpoint import SINGLE_FILE, load_config
from nextserve.model.tokenizer import load_tokenizer


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_capturing_logs(path):
    """Load with transformers, returning (model, loading info, every log message transformers wrote
    at WARNING or above). transformers' loggers do not propagate to the root logger, so caplog cannot
    see them: attach to its library logger directly."""
    logger = logging.getLogger("transformers")
    handler, previous = _Records(), logger.level
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        model, info = Qwen3NextForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    return model, info, handler.messages


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return _load_capturing_logs(tiny_checkpoint)


def _weight_warnings(messages):
    keywords = ("missing", "unexpected", "mismatch", "newly initialized", "not used", "not initialized")
    return [m for m in messages if any(k in m.lower() for k in keywords)]


def test_loads_without_weight_warnings(loaded, tiny_checkpoint):
    model, info, messages = loaded
    assert _weight_warnings(messages) == []
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    # mtp.* is dropped on purpose by transformers; anything else unexpected is our bug.
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
    assert any(k.startswith("mtp.") for k in load_file(tiny_checkpoint / SINGLE_FILE))


def test_log_capture_sees_a_broken_checkpoint(tiny_checkpoint, tmp_path):
    # The negative control: without it, an empty capture could mean the capture is broken.
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    tensors = load_file(copy / SINGLE_FILE)
    del tensors["model.layers.2.linear_attn.dt_bias"]
    save_file(tensors, copy / SINGLE_FILE, metadata={"format": "pt"})
    _, info, messages = _load_capturing_logs(copy)
    assert "model.layers.2.linear_attn.dt_bias" in info["missing_keys"]
    assert any("model.layers.2.linear_attn.dt_bias" in m for m in _weight_warnings(messages))


def test_fused_experts_equal_the_per_expert_tensors(loaded, tiny_checkpoint):
    model = loaded[0]
    file = load_file(tiny_checkpoint / SINGLE_FILE)
    config = load_config(tiny_checkpoint)
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for e in range(config.num_experts):
            prefix = f"model.layers.{i}.mlp.experts.{e}"
            gate_up = torch.cat([file[f"{prefix}.gate_proj.weight"], file[f"{prefix}.up_proj.weight"]])
            assert torch.equal(experts.gate_up_proj[e], gate_up), prefix
            assert torch.equal(experts.down_proj[e], file[f"{prefix}.down_proj.weight"]), prefix


def test_every_other_parameter_equals_the_file(loaded, tiny_checkpoint):
    model = loaded[0]
    file = load_file(tiny_checkpoint / SINGLE_FILE)
    params = dict(model.named_parameters())
    unfused = {n for n in params if ".mlp.experts." not in n}
    assert unfused <= set(file)
    for name in unfused:
        assert torch.equal(params[name], file[name]), name


def test_logits_are_well_scaled_and_input_dependent(loaded, tiny_checkpoint):
    model = loaded[0]
    tokenizer = load_tokenizer(tiny_checkpoint)
    ids = torch.tensor([tokenizer.encode("On a cold morning in early spring, the harbour was quiet. 🚀 你好")])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logits = out.logits[0]
    assert torch.isfinite(logits).all()
    assert 0.5 < logits.std(-1).mean().item() < 5
    assert len(set(logits.argmax(-1).tolist())) > ids.shape[1] // 3  # greedy picks vary with the input
    # the residual stream stays O(1) through the layers (no vanishing or exploding init)
    rms = [h.pow(2).mean().sqrt().item() for h in out.hidden_states]
    assert all(0.3 < r < 10 for r in rms), rms


def test_auto_tokenizer_agrees(tiny_checkpoint):
    ours = load_tokenizer(tiny_checkpoint)
    theirs = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert theirs.eos_token_id == ours.eos_token_id == theirs.pad_token_id
    for text in ["plain English words", "emoji 🚀👍🏽 and 漢字", "<|im_start|>user\nhi<|im_end|>"]:
        ids = ours.encode(text)
        assert theirs(text, add_special_tokens=False).input_ids == ids
        assert theirs.decode(ids) == text == ours.decode(ids)
