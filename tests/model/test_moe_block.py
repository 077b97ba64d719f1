"""The MoE block's split between routed and shared experts: the dispatch is started first, the shared
expert runs while it is away, and the two are added in fp32 and rounded once."""
import torch
from torch import nn


class RecordingExperts(nn.Module):
    """The block's own local experts, with each call recorded: dispatch started, result waited for."""

    def __init__(self, experts, events):
        super().__init__()
        self.experts, self.events = experts, events

    def dispatch(self, hidden, expert_ids, weights):
        self.events.append("dispatch")
        wait = self.experts.dispatch(hidden, expert_ids, weights)

        def result():
            self.events.append("wait")
            return wait()
        return result


def test_the_shared_expert_runs_between_starting_the_dispatch_and_waiting_for_it():
    from nextserve.model.config import Qwen3NextConfig
    from nextserve.model.moe import SparseMoeBlock
    from nextserve.model.presets import PRESETS

    config = Qwen3NextConfig.from_dict(PRESETS["tiny"])
    torch.manual_seed(0)
    block = SparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    block = block.bfloat16()
    x = torch.randn(5, config.hidden_size).bfloat16()
    with torch.inference_mode():
        expected = block(x)
        events = []
        local = block.experts
        block.experts = RecordingExperts(local, events)
        # the shared expert's own work after the block's one input matmul: its down projection
        hook = block.shared_expert.down_proj.register_forward_hook(lambda *_: events.append("shared"))
        got = block(x)
        block.experts = local
        hook.remove()
        weights, ids = block.route(x)
        routed = local(x, ids, weights)
        shared = block.shared(x)
    assert events == ["dispatch", "shared", "wait"]
    assert torch.equal(got, expected) and got.dtype == torch.bfloat16
    assert routed.dtype == torch.float32  # the routed sum reaches the block unrounded
    assert torch.equal(got, (routed + shared.float()).bfloat16())  # one rounding, after the fp32 add
