"""The expert worker: loads only its share, and its gRPC answers equal the local experts."""
import math

import grpc
import pytest
import torch

from nextserve.model.checkpoint import expected_tensors, is_expert_tensor, load_config
from nextserve.model.make_checkpoint import make_checkpoint
from nextserve.model.moe import Experts
from nextserve.proto import tensors
from nextserve.proto.v1 import experts_pb2, experts_pb2_grpc
from nextserve.worker.fingerprint import checkpoint_fingerprint
from nextserve.worker.plan import ExpertPlan
from nextserve.worker.shard import ShardExperts


def test_worker_memory_is_its_share_of_the_experts(tiny_checkpoint):
    config = load_config(tiny_checkpoint)
    shapes = expected_tensors(config)  # the MTP head's experts too: the router's speculative decoding needs them
    all_expert_bytes = 4 * sum(math.prod(s) for n, s in shapes.items() if is_expert_tensor(n))
    all_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    plan = ExpertPlan.contiguous(config.num_experts, 4)
    shard = ShardExperts.load(tiny_checkpoint, plan.experts_of(1), dtype="float32")
    assert shard.parameter_bytes * 4 == all_expert_bytes
    assert shard.parameter_bytes < all_bytes / 4
    assert shard.expert_ids == [3, 4, 5]


def test_local_forward_matches_the_full_experts_and_skips_other_shards(tiny_checkpoint, reference_model, close):
    config = load_config(tiny_checkpoint)
    shard = ShardExperts.load(tiny_checkpoint, [0, 1, 2, 3, 4, 5], dtype="float32")
    full: Experts = reference_model.model.layers[2].mlp.experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, config.hidden_size, generator=g)
    ids = torch.tensor([[0, 5, 11]] * 7)
    weights = torch.rand(7, 3, generator=g)
    mine = torch.tensor([[0, 5, -1]] * 7)  # expert 11 is elsewhere: the router sends -1
    expected = full(hidden, mine.clamp(min=0), weights * (mine >= 0))
    chain = config.hidden_size + config.moe_intermediate_size + 3
    close(shard.forward(2, hidden, ids, weights), expected, reduction=chain)
    close(shard.forward(2, hidden, mine, weights), expected, reduction=chain)
    with pytest.raises(ValueError, match="not an MoE layer"):
        shard.forward(9, hidden, ids, weights)


def test_experts_stream_over_grpc_and_a_bad_request_keeps_the_stream_open(servers, in_process_workers,
                                                                          tiny_checkpoint, reference_model, close):
    workers = in_process_workers(1)
    address = workers.addresses[0][0]
    config = load_config(tiny_checkpoint)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, config.hidden_size, generator=g)
    ids = torch.randint(0, config.num_experts, (5, 3), generator=g)
    weights = torch.rand(5, 3, generator=g)

    async def exchange():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = experts_pb2_grpc.ExpertWorkerStub(channel)
            info = await stub.Info(experts_pb2.InfoRequest(), timeout=10)
            call = stub.Experts(timeout=30)
            await call.write(experts_pb2.ExpertRequest(request_id=1, layer=99, hidden=tensors.to_wire(hidden),
                                                       expert_ids=tensors.to_wire(ids.int()),
                                                       weights=tensors.to_wire(weights)))
            await call.write(experts_pb2.ExpertRequest(request_id=2, layer=1, hidden=tensors.to_wire(hidden),
                                                       expert_ids=tensors.to_wire(ids.int()),
                                                       weights=tensors.to_wire(weights)))
            first, second = await call.read(), await call.read()
            await call.done_writing()
            return info, first, second

    info, bad, good = servers.run(exchange())
    assert info.fingerprint == checkpoint_fingerprint(tiny_checkpoint)
    assert list(info.expert_ids) == list(range(config.num_experts)) and info.shard == 0
    assert bad.request_id == 1 and "layer 99" in bad.error
    assert good.request_id == 2 and not good.error
    expected = reference_model.model.layers[1].mlp.experts(hidden, ids, weights)
    close(tensors.from_wire(good.output), expected, reduction=config.hidden_size + config.moe_intermediate_size + ids.shape[1])


def test_fingerprint_tells_checkpoints_apart(tiny_checkpoint, tmp_path):
    other = tmp_path / "tiny-seed1"
    make_checkpoint(other, "tiny", seed=1, progress=False)
    assert checkpoint_fingerprint(tiny_checkpoint) == checkpoint_fingerprint(tiny_checkpoint)
    assert checkpoint_fingerprint(other) != checkpoint_fingerprint(tiny_checkpoint)


def test_tensor_wire_format_round_trips_and_checks_sizes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32):
        t = (torch.arange(12).reshape(3, 4) - 5).to(dtype)
        msg = tensors.to_wire(t)
        assert len(msg.data) == 12 * t.element_size()
        assert torch.equal(tensors.from_wire(msg), t)
    msg = tensors.to_wire(torch.zeros(2, 3))
    msg.data = msg.data[:-4]
    with pytest.raises(ValueError, match="needs 24 bytes"):
        tensors.from_wire(msg)
