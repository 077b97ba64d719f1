"""The decode path's load-time and per-step shortcuts keep the model what it was.

- Packed projections (model/packed.py): a loaded model's linears that read one input share one
  weight tensor, yet its parameters, state_dict and saved checkpoint are unchanged, in-place loads
  reach the packed tensor, a moved model falls back to concatenating, and gradients still reach
  every parameter.
- The CPU kernel path against the plain references, end to end: prefill then decode of a batch of
  sequences at different depths gives the same logits on both (NEXTSERVE_KERNELS=cpu vs =torch).
- ForwardBatch.build's metadata, built in Python, is what the block tables say.
"""
import pytest
import torch

from nextserve.kernels.paging import BLOCK_SIZE
from nextserve.model import Qwen3NextForCausalLM, StaticCache
from nextserve.model.packed import PackedRows, pack_projections
from nextserve.model.presets import config_from_preset
from nextserve.model.state import ForwardBatch


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def packed_groups(model):
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, PackedRows)]


def test_a_loaded_model_computes_each_group_of_projections_from_one_tensor(model, tiny_checkpoint):
    from safetensors.torch import load_file

    groups = packed_groups(model)
    config = model.config
    # the in-projections of every mixer (DeltaNet's qkvz + ba, attention's q, k, v), the shared expert's
    # gate + up of every MoE block
    assert len(groups) == config.num_hidden_layers + sum(map(config.is_moe_layer, range(config.num_hidden_layers)))
    for group in groups:
        with torch.no_grad():  # with gradients wanted, weight() concatenates instead
            packed = group.weight()
        assert packed.shape == (sum(group.sizes), group.linears[0].in_features)
        for linear, rows in zip(group.linears, packed.split(group.sizes)):
            assert linear.weight.data_ptr() == rows.data_ptr()  # the parameter IS its rows: nothing copied
    state = model.state_dict()
    assert set(state) == {name for name, _ in model.named_parameters()}  # packing adds no entries
    on_disk = load_file(tiny_checkpoint / "model.safetensors")
    for name, tensor in state.items():
        if name in on_disk:
            assert torch.equal(tensor, on_disk[name]), name


def test_packed_weights_follow_in_place_edits_and_a_replaced_weight_falls_back(tiny_checkpoint):
    model = Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    attn = model.model.layers[3].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(2)  # an in-place edit of one parameter: the packed tensor sees it
    with torch.no_grad():
        packed = attn.qkv_proj.weight()
    assert packed.data_ptr() == attn.q_proj.weight.data_ptr()
    assert torch.equal(packed[attn.q_proj.out_features:][:attn.k_proj.out_features], attn.k_proj.weight)
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone() + 1)  # replaced: no longer a view
    with torch.no_grad():
        concatenated = attn.qkv_proj.weight()
    assert concatenated.data_ptr() != packed.data_ptr()
    assert torch.equal(concatenated, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))


def test_gradients_reach_every_parameter_of_a_packed_group(tiny_checkpoint):
    model = Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).train()
    layer = model.model.layers[0]
    x = torch.randn(5, model.config.hidden_size)
    batch = StaticCache(model, 1, 5).batch([0], [5])
    layer.linear_attn(x, batch).square().sum().backward()
    for linear in (layer.linear_attn.in_proj_qkvz, layer.linear_attn.in_proj_ba):
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_an_unpacked_model_computes_what_the_packed_one_does(model, tiny_checkpoint, logits_close):
    """A model built by hand (as training builds it) concatenates on the fly; packing it changes nothing."""
    fresh = Qwen3NextForCausalLM(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    unpacked = fresh(ids)
    pack_projections(fresh)
    assert torch.equal(fresh(ids), unpacked)
    logits_close(unpacked, model(ids), model.config, 9)


def test_saving_a_loaded_model_writes_the_checkpoint_it_came_from(model, tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from tokenizers import Tokenizer

    from nextserve.model.save import save_pretrained

    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    save_pretrained(model, tokenizer, tmp_path / "again", dtype=torch.float32)
    original, again = load_file(tiny_checkpoint / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    for name, tensor in again.items():
        assert torch.equal(tensor, original[name]), name


# --- the CPU kernel path against the references ---------------------------------------------------

def decode_run(model, prompts, steps):
    """Prefill prompts of unequal length into one cache, then `steps` greedy decode steps of all of them;
    returns the logits of every step."""
    B = len(prompts)
    cache = StaticCache(model, B, max(map(len, prompts)) + steps)
    seen = []
    for seq, prompt in enumerate(prompts):  # one prefill each, so the decode batch mixes depths
        logits, _ = model.forward_batch(torch.tensor(prompt), cache.batch([seq], [len(prompt)]))
        seen.append(logits[0])
    ids = torch.stack(seen).argmax(-1)
    steps_logits = []
    for _ in range(steps):
        logits, _ = model.forward_batch(ids, cache.batch(list(range(B)), [1] * B))
        steps_logits.append(logits)
        ids = logits.argmax(-1)
    return torch.stack(steps_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_on_the_cpu_path_equals_the_references(tiny_checkpoint, monkeypatch, dtype, logits_close):
    model = Qwen3NextForCausalLM.from_pretrained(tiny_checkpoint, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 70, 17)]
    runs = {}
    for backend in ("cpu", "torch"):
        monkeypatch.setenv("NEXTSERVE_KERNELS", backend)
        runs[backend] = decode_run(model, prompts, steps=6)
    logits_close(runs["cpu"], runs["torch"], model.config, 70 + 6, dtype=dtype)


# --- ForwardBatch ------------------------------------------------------------------------------------

def test_forward_batch_metadata_follows_the_block_tables(tiny_checkpoint):
    config = config_from_preset("tiny")
    model = Qwen3NextForCausalLM(config)
    pools = model.allocate_pools(10, 4)
    tables = [[7, 2], [5], [9, 0, 3]]
    batch = ForwardBatch.build(pools, context_lens=[64, 3, 127], seq_lens=[2, 1, 3], block_tables=tables,
                               state_slots=[3, 0, 2], device="cpu")
    assert batch.positions.tolist() == [64, 65, 3, 127, 128, 129]
    expected_slots = [2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 1, 5 * BLOCK_SIZE + 3, 63, 3 * BLOCK_SIZE, 3 * BLOCK_SIZE + 1]
    assert batch.slot_mapping.tolist() == expected_slots
    assert batch.cu_seqlens.tolist() == [0, 2, 3, 6] and batch.cu_seqlens.dtype == torch.int32
    assert batch.block_tables.tolist() == [[7, 2, 0], [5, 0, 0], [9, 0, 3]]
    assert batch.block_tables.dtype == torch.int32 and batch.block_tables.is_contiguous()
    assert batch.seq_lens_k.tolist() == [66, 4, 130] and batch.seq_lens_k.dtype == torch.int32
    assert batch.state_slots.tolist() == [3, 0, 2] and batch.state_slots.dtype == torch.int64
    assert batch.positions.dtype == batch.slot_mapping.dtype == torch.int64
    assert torch.equal(batch.last_token_indices(), torch.tensor([1, 2, 5]))
