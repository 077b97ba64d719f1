import json

import pytest

from nextserve.worker.plan import ExpertPlan


def test_contiguous_covers_every_expert_once():
    plan = ExpertPlan.contiguous(512, 8)
    plan.validate()
    assert plan.num_shards == 8
    assert plan.experts_of(0) == tuple(range(0, 64))
    assert plan.experts_of(7) == tuple(range(448, 512))
    held = [e for s in plan.shards for e in s.experts]
    assert sorted(held) == list(range(512))
    assert plan.shards_of(65) == (1,)


def test_contiguous_requires_divisibility_and_says_so():
    with pytest.raises(ValueError, match="cannot be split evenly"):
        ExpertPlan.contiguous(10, 3)
    with pytest.raises(ValueError):
        ExpertPlan.contiguous(10, 0)


def test_json_round_trip_is_canonical_and_stable():
    a = ExpertPlan.from_mapping(4, {1: [3, 2], 0: [1, 0]})
    b = ExpertPlan.from_mapping(4, [{"shard": 0, "experts": [0, 1]}, {"shard": 1, "experts": [2, 3]}])
    assert a.to_json() == b.to_json()
    assert a.fingerprint() == b.fingerprint()
    assert a.to_json() == ExpertPlan.contiguous(4, 2).to_json()
    data = json.loads(a.to_json())
    assert data == {"version": 1, "num_experts": 4, "shards": [{"shard": 0, "experts": [0, 1]}, {"shard": 1, "experts": [2, 3]}]}
    assert ExpertPlan.from_json(a.to_json()) == ExpertPlan.contiguous(4, 2)
    assert ExpertPlan.contiguous(4, 2).fingerprint() != ExpertPlan.contiguous(4, 4).fingerprint()


def test_uneven_and_replicated_experts_are_allowed():
    plan = ExpertPlan.from_mapping(5, {0: [0, 1, 2], 1: [2, 3, 4]})
    plan.validate()
    assert plan.shards_of(2) == (0, 1)
    assert plan.shards_of(4) == (1,)


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ({0: [0, 1], 1: [2, 9]}, r"out of range 0\.\.3: 9"),
        ({0: [0], 1: [3]}, r"2 experts are held by no shard: 1, 2"),
        ({0: [0, 1, 2, 3], 1: []}, r"shards without experts: 1"),
    ],
)
def test_validate_names_the_problem(shards, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlan.from_mapping(4, shards).validate()


def test_duplicate_shards_rejected():
    text = json.dumps({"version": 1, "num_experts": 2, "shards": [{"shard": 0, "experts": [0]}, {"shard": 0, "experts": [1]}]})
    with pytest.raises(ValueError, match="duplicate shard indices: 0"):
        ExpertPlan.from_json(text)


def test_missing_experts_are_abbreviated():
    with pytest.raises(ValueError) as info:
        ExpertPlan.from_mapping(512, {0: [0]}).validate()
    assert "511 experts are held by no shard" in str(info.value)
    assert "(511 in all)" in str(info.value)
    assert len(str(info.value)) < 120


def test_from_json_rejects_bad_documents():
    with pytest.raises(ValueError, match="not valid JSON"):
        ExpertPlan.from_json("{")
    with pytest.raises(ValueError, match="version"):
        ExpertPlan.from_json('{"version": 2, "num_experts": 1, "shards": []}')
    with pytest.raises(ValueError, match="lacks the field 'shards'"):
        ExpertPlan.from_json('{"version": 1, "num_experts": 1}')


def test_lookup_errors():
    plan = ExpertPlan.contiguous(4, 2)
    with pytest.raises(KeyError):
        plan.experts_of(5)
    with pytest.raises(KeyError):
        plan.shards_of(4)


def test_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, nextserve.worker.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
