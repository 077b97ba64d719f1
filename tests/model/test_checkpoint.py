import hashlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextserve.model.checkpoint import (
    INDEX_FILE, SINGLE_FILE, CheckpointError, CheckpointReader, dense_predicate, expected_tensors,
    expert_tensor_predicate, is_expert_tensor, load_config, parameter_counts, validate,
)
from nextserve.model.make_checkpoint import make_checkpoint, parse_size
from nextserve.model.presets import PRESETS, config_from_preset

SHARD_LIMIT = 100_000  # bytes: splits the 2.3 MB tiny checkpoint into ~25 shards


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "tiny"
    make_checkpoint(out, "tiny", seed=0, max_shard_size=SHARD_LIMIT, progress=False)
    return out


@pytest.fixture
def broken_copy(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint whose tensors a test may edit."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, out)
    return out


def _rewrite(directory, edit):
    tensors = load_file(directory / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})


def _hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# --- layout -------------------------------------------------------------------------------------------

def test_file_holds_exactly_the_expected_tensors(tiny_checkpoint):
    config = load_config(tiny_checkpoint)
    reader = CheckpointReader(tiny_checkpoint)
    assert reader.shapes() == expected_tensors(config)
    assert validate(reader, config) == len(expected_tensors(config))
    assert config.vocab_size == 512 and config.eos_token_id == 0 and config.torch_dtype == "float32"


def test_real_model_layout_matches_the_published_shapes():
    config = config_from_preset("80b-a3b")
    shapes = expected_tensors(config)
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (12288, 2048)
    assert shapes["model.layers.0.linear_attn.in_proj_ba.weight"] == (64, 2048)
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (8192, 2048)
    assert shapes["model.layers.3.self_attn.o_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.47.mlp.experts.511.down_proj.weight"] == (2048, 512)
    assert shapes["mtp.fc.weight"] == (2048, 4096)
    assert shapes["mtp.layers.0.self_attn.q_norm.weight"] == (256,)
    assert "model.layers.0.self_attn.q_proj.weight" not in shapes  # layer 0 is DeltaNet
    counts = parameter_counts(config)
    assert 79.5e9 < counts["total"] - counts["mtp"] < 79.9e9
    assert 3.0e9 < counts["active"] < 4.0e9


def test_preset_sizes():
    tiny = parameter_counts(config_from_preset("tiny"))["total"]
    small = parameter_counts(config_from_preset("small"))["total"]
    assert tiny < 1_000_000
    assert 10e6 < small < 100e6  # "tens of millions": big enough to measure, quick to make
    experts = config_from_preset("tiny").num_experts
    assert experts & (experts - 1) != 0, "tiny must not have a power-of-two expert count"
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_preset("huge")
    assert set(PRESETS) == {"tiny", "small", "stdlib", "80b-a3b"}
    stdlib = parameter_counts(config_from_preset("stdlib"))["total"]
    assert stdlib * 2 <= 30e6, "the trained model ships as at most ~30 MB of bf16"


def test_init_statistics_follow_the_norm_conventions(tiny_checkpoint):
    t = CheckpointReader(tiny_checkpoint).load()
    zero_centred = t["model.layers.0.input_layernorm.weight"]
    gated = t["model.layers.0.linear_attn.norm.weight"]
    assert zero_centred.abs().mean() < 0.2 and zero_centred.abs().max() > 0  # near 0, not all zeros
    assert (gated.mean() - 1).abs() < 0.1
    a = t["model.layers.0.linear_attn.A_log"].exp()
    assert a.min() >= 1 and a.max() <= 16
    dt = torch.nn.functional.softplus(t["model.layers.0.linear_attn.dt_bias"])
    assert dt.min() >= 1e-3 * 0.99 and dt.max() <= 0.1 * 1.01
    q = t["model.layers.3.self_attn.q_proj.weight"]
    assert math.isclose(q.std().item(), 1 / math.sqrt(64), rel_tol=0.1)


# --- selective loading --------------------------------------------------------------------------------

def test_expert_predicate_loads_exactly_those_experts(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint)
    loaded = reader.load(expert_tensor_predicate({1, 10}))
    config = load_config(tiny_checkpoint)
    layers = [f"model.layers.{i}" for i in range(config.num_hidden_layers)] + ["mtp.layers.0"]
    wanted = {
        f"{layer}.mlp.experts.{e}.{proj}.weight"
        for layer in layers for e in (1, 10) for proj in ("gate_proj", "up_proj", "down_proj")
    }
    assert set(loaded) == wanted  # expert 1 must not drag in 10's neighbours such as 11
    full = load_file(tiny_checkpoint / SINGLE_FILE)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, full[name])


def test_dense_predicate_is_everything_but_routed_experts(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint)
    dense = reader.load(dense_predicate)
    assert not any(is_expert_tensor(n) for n in dense)
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in dense
    assert "model.layers.0.mlp.gate.weight" in dense
    experts = reader.load(expert_tensor_predicate(range(12)))
    assert set(dense) | set(experts) == set(reader.names())
    assert not set(dense) & set(experts)


def test_validate_respects_the_predicate(broken_copy):
    _rewrite(broken_copy, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    reader, config = CheckpointReader(broken_copy), load_config(broken_copy)
    assert validate(reader, config, predicate=expert_tensor_predicate({4, 6})) == 5 * 2 * 3
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        validate(reader, config, predicate=expert_tensor_predicate({5}))


# --- sharding -----------------------------------------------------------------------------------------

def test_sharded_equals_single_file(tiny_checkpoint, sharded_checkpoint):
    single = CheckpointReader(tiny_checkpoint).load()
    reader = CheckpointReader(sharded_checkpoint)
    assert not (sharded_checkpoint / SINGLE_FILE).exists()
    assert len(reader.files()) > 10
    sharded = reader.load()
    assert set(sharded) == set(single)
    assert all(torch.equal(sharded[n], single[n]) for n in single)
    validate(reader, load_config(sharded_checkpoint))


def test_shards_respect_the_size_limit_and_index(sharded_checkpoint):
    index = json.loads((sharded_checkpoint / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    total = 0
    for file in files:
        tensors = load_file(sharded_checkpoint / file)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= SHARD_LIMIT or len(tensors) == 1
        assert {k for k, v in index["weight_map"].items() if v == file} == set(tensors)
        total += nbytes
    assert index["metadata"]["total_size"] == total


def test_parse_size():
    assert parse_size("10MB") == 10_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(4096) == 4096
    for bad in ("ten MB", "5XB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


# --- errors -------------------------------------------------------------------------------------------

def test_missing_tensor(broken_copy):
    _rewrite(broken_copy, lambda t: t.pop("model.layers.1.linear_attn.A_log"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: model\.layers\.1\.linear_attn\.A_log"):
        validate(CheckpointReader(broken_copy), load_config(broken_copy))


def test_many_missing_tensors_are_summarised(broken_copy):
    def drop_layer(t):
        for name in [n for n in t if n.startswith("model.layers.1.")]:
            del t[name]

    _rewrite(broken_copy, drop_layer)
    with pytest.raises(CheckpointError, match=r"missing \d+ tensors: .*\(and \d+ more\)"):
        validate(CheckpointReader(broken_copy), load_config(broken_copy))


def test_unexpected_tensor(broken_copy):
    _rewrite(broken_copy, lambda t: t.update({"model.layers.0.mlp.experts.12.up_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors: model\.layers\.0\.mlp\.experts\.12\.up_proj"):
        validate(CheckpointReader(broken_copy), load_config(broken_copy))


def test_misshaped_tensor(broken_copy):
    _rewrite(broken_copy, lambda t: t.update({"model.norm.weight": torch.zeros(65)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight expected \[64\] found \[65\]"):
        validate(CheckpointReader(broken_copy), load_config(broken_copy))


def test_mtp_may_be_absent_but_not_partial(broken_copy):
    def drop_mtp(t):
        for name in [n for n in t if n.startswith("mtp.")]:
            del t[name]

    _rewrite(broken_copy, drop_mtp)
    reader, config = CheckpointReader(broken_copy), load_config(broken_copy)
    assert validate(reader, config) == len(expected_tensors(config, include_mtp=False))
    with pytest.raises(CheckpointError, match=r"mtp\.fc\.weight"):
        validate(reader, config, allow_missing_mtp=False)


def test_partial_mtp_is_an_error(broken_copy):
    _rewrite(broken_copy, lambda t: t.pop("mtp.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: mtp\.norm\.weight"):
        validate(CheckpointReader(broken_copy), load_config(broken_copy))


def test_truncated_file(broken_copy):
    file = broken_copy / SINGLE_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        CheckpointReader(broken_copy)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x01\x02", b"garbage that is not a safetensors file at all",
     (20).to_bytes(8, "little") + b"{not json!!!!!!!!!!}",
     (9).to_bytes(8, "little") + b'{"x": 1} '],
    ids=["empty", "tiny", "text", "bad-json", "bad-entry"],
)
def test_garbage_file(broken_copy, content):
    (broken_copy / SINGLE_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        CheckpointReader(broken_copy)


def test_missing_shard(sharded_checkpoint, tmp_path):
    copy = shutil.copytree(sharded_checkpoint, tmp_path / "copy")
    victim = sorted(copy.glob("model-*.safetensors"))[3]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"do not exist: {victim.name} \(\d+ tensors\)"):
        CheckpointReader(copy)


def test_index_naming_a_tensor_its_shard_lacks(sharded_checkpoint, tmp_path):
    copy = shutil.copytree(sharded_checkpoint, tmp_path / "copy")
    index = json.loads((copy / INDEX_FILE).read_text())
    first_shard = min(index["weight_map"].values())
    assert index["weight_map"]["model.norm.weight"] != first_shard
    index["weight_map"]["model.norm.weight"] = first_shard
    (copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"does not contain: model\.norm\.weight"):
        CheckpointReader(copy)


def test_garbage_index(sharded_checkpoint, tmp_path):
    copy = shutil.copytree(sharded_checkpoint, tmp_path / "copy")
    (copy / INDEX_FILE).write_text("{ this is not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid safetensors index"):
        CheckpointReader(copy)


def test_empty_directory_missing_config_and_unknown_name(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="no tensor named 'model.layers.9.input_layernorm.weight'"):
        CheckpointReader(tiny_checkpoint).get("model.layers.9.input_layernorm.weight")


# --- dtypes -------------------------------------------------------------------------------------------

def test_dtype_conversion_on_load(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint)
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    fp32 = reader.get(name)
    assert fp32.dtype == torch.float32
    for spec, dtype in [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)]:
        converted = reader.get(name, dtype=spec)
        assert converted.dtype == dtype
        # one rounding to nearest in the target dtype: half an ulp of each element, and below the
        # smallest normal number the subnormals' fixed spacing
        info = torch.finfo(dtype)
        torch.testing.assert_close(converted.float(), fp32, rtol=info.eps / 2, atol=info.smallest_normal * info.eps / 2)
    loaded = reader.load(dense_predicate, dtype="bfloat16")
    assert {t.dtype for t in loaded.values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unsupported dtype"):
        reader.get(name, dtype="int3")


def test_bfloat16_checkpoint(tmp_path, tiny_checkpoint):
    config = make_checkpoint(tmp_path, "tiny", seed=0, dtype="bfloat16", progress=False)
    assert config.torch_dtype == "bfloat16"
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    bf16 = CheckpointReader(tmp_path).load()
    fp32 = CheckpointReader(tiny_checkpoint).load()
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[n], fp32[n].to(torch.bfloat16)) for n in fp32)  # same draws, rounded


# --- determinism --------------------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes(tmp_path, tiny_checkpoint, sharded_checkpoint):
    make_checkpoint(tmp_path / "again", "tiny", seed=0, progress=False)
    assert _hashes(tmp_path / "again") == _hashes(tiny_checkpoint)
    make_checkpoint(tmp_path / "again-sharded", "tiny", seed=0, max_shard_size=SHARD_LIMIT, progress=False)
    assert _hashes(tmp_path / "again-sharded") == _hashes(sharded_checkpoint)


def test_different_seed_gives_different_weights(tmp_path, tiny_checkpoint):
    make_checkpoint(tmp_path / "other", "tiny", seed=1, progress=False)
    ours, theirs = _hashes(tiny_checkpoint), _hashes(tmp_path / "other")
    assert ours[SINGLE_FILE] != theirs[SINGLE_FILE]
    assert {k: v for k, v in ours.items() if k != SINGLE_FILE} == {k: v for k, v in theirs.items() if k != SINGLE_FILE}


def test_rewrite_replaces_earlier_shards(tmp_path):
    make_checkpoint(tmp_path, "tiny", seed=0, max_shard_size=SHARD_LIMIT, progress=False)
    make_checkpoint(tmp_path, "tiny", seed=0, progress=False)
    assert sorted(p.name for p in tmp_path.glob("model*")) == [SINGLE_FILE]


# --- command line ---------------------------------------------------------------------------------------

def _cli(argv):
    import argparse

    from nextserve.cli import checkpoint as checkpoint_cli

    parser = argparse.ArgumentParser(prog="nextserve")
    checkpoint_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_make_and_inspect(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "made"
    assert _cli(["checkpoint", "make", "--preset", "tiny", "--out", str(out), "--max-shard-size", "500KB"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 5
    assert CheckpointReader(out).load().keys() == CheckpointReader(tiny_checkpoint).load().keys()
    capsys.readouterr()
    assert _cli(["checkpoint", "inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "563,272 expected" in report and "validation    ok (255 tensors)" in report


def test_cli_inspect_reports_a_broken_checkpoint(broken_copy, capsys):
    _rewrite(broken_copy, lambda t: t.pop("lm_head.weight"))
    assert _cli(["checkpoint", "inspect", str(broken_copy)]) == 1
    assert "missing 1 tensors: lm_head.weight" in capsys.readouterr().out
