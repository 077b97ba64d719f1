"""Ops and host syncs of one decode step, counted with the torch profiler, and where they come from.

On a GPU every op is a kernel launch and every host sync (a `.item()`, `.tolist()`, `nonzero`, a
data-dependent shape) stalls the launch queue; on the CPU they are dispatcher and Python overhead.
At the small preset's size that overhead, not bandwidth, bounds decode, so these two numbers are
the ones to cut.

    python bench/step_profile.py --checkpoint checkpoints/small                 # totals, batch 1 and 16
    python bench/step_profile.py --checkpoint checkpoints/small --by layer      # one row per decoder layer
    python bench/step_profile.py --checkpoint checkpoints/small --by module     # per module and kernel op
    python bench/step_profile.py --checkpoint checkpoints/small --by kind       # modules summed over layers

The breakdown puts each top-level op under the innermost module it ran in (scopes opened by
forward hooks) and the `kernels.ops` function it ran in (wrapped for the profiled step only);
`ForwardBatch.build` and what `forward_batch` does outside the modules get scopes of their own.
Nothing is installed in the model outside the profiled step.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import re
from collections import Counter, defaultdict
from contextlib import contextmanager

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

# aten ops that copy a device value to the host, or whose output shape depends on data
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2",
            "aten::masked_select", "aten::equal", "aten::repeat_interleave")  # item() is _local_scalar_dense

MODULE_SCOPE, OP_SCOPE = "module:", "op:"
OUTSIDE = "(outside the model)"


def _top_level(events):
    return [e for e in events if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


def count_step(step) -> dict:
    """Run `step()` once under the profiler; top-level aten ops (as dispatched from Python) and syncs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = _top_level(events)
    syncs = Counter(e.name for e in events if e.name in SYNC_OPS)
    return {"ops": len(top), "aten_calls": len(events), "host_syncs": sum(syncs.values()),
            "sync_ops": dict(syncs.most_common())}


# -- attributing ops to modules ------------------------------------------------------------------

@contextmanager
def scopes(model):
    """Profiler scopes around every submodule's forward (named as in `named_modules`) and every
    public function of `nextserve.kernels.ops`, removed on exit."""
    handles, open_scopes = [], defaultdict(list)
    for name, module in model.named_modules():
        if not name:
            continue

        def enter(_m, _args, name=name):
            scope = record_function(MODULE_SCOPE + name)
            scope.__enter__()
            open_scopes[name].append(scope)

        def leave(_m, _args, _out, name=name):
            open_scopes[name].pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    def wrap(name, fn):
        @functools.wraps(fn)
        def scoped(*args, **kwargs):
            with record_function(OP_SCOPE + name):
                return fn(*args, **kwargs)
        return scoped

    try:
        with wrapped_ops(wrap):
            yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def wrapped_ops(wrap):
    """Every public function of `nextserve.kernels.ops` replaced by `wrap(name, fn)` (kernel_backend
    aside: the others call it, and it would be counted inside them), restored on exit."""
    from nextserve.kernels import ops
    originals = {name: fn for name, fn in vars(ops).items()
                 if inspect.isfunction(fn) and fn.__module__ == ops.__name__ and not name.startswith("_")
                 and name != "kernel_backend"}
    try:
        for name, fn in originals.items():
            setattr(ops, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)


def _scope_of(event) -> tuple[str, str | None]:
    """(innermost module, innermost kernels.ops function or None) an op ran in; outside every
    module, the step's own outermost scope (batch build, forward_batch)."""
    op = step_scope = None
    parent = event.cpu_parent
    while parent is not None:
        name = parent.name
        if name.startswith(MODULE_SCOPE):
            return name[len(MODULE_SCOPE):], op
        if name.startswith(OP_SCOPE):
            op = op or name[len(OP_SCOPE):]
        elif not name.startswith("aten::"):
            step_scope = name
        parent = parent.cpu_parent
    return step_scope or OUTSIDE, op


def breakdown_step(model, step) -> list[dict]:
    """Run `step()` once with scopes; one row per (module, kernels.ops function) with its top-level
    ops and host syncs (syncs counted among every aten call below it), in first-seen order."""
    with scopes(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = list(prof.events())
    rows: dict[tuple[str, str | None], dict] = {}
    for e in _top_level(events):
        key = _scope_of(e)
        row = rows.setdefault(key, {"module": key[0], "op": key[1], "ops": 0, "host_syncs": 0})
        row["ops"] += 1
    for e in events:
        if e.name in SYNC_OPS:
            top = e
            while top.cpu_parent is not None and top.cpu_parent.name.startswith("aten::"):
                top = top.cpu_parent
            key = _scope_of(top)
            rows.setdefault(key, {"module": key[0], "op": key[1], "ops": 0, "host_syncs": 0})["host_syncs"] += 1
    return list(rows.values())


_LAYER = re.compile(r"^(model\.layers|mtp\.layers)\.(\d+)")


def group(rows: list[dict], by: str, layer_types: list[str]) -> list[tuple[str, int, int]]:
    """(label, ops, syncs) for `by` = "layer" (one row per decoder layer and the rest), "module"
    (module path and kernel op) or "kind" (module path with the layer index replaced by its type)."""
    out: dict[str, list[int]] = {}
    for r in rows:
        m = _LAYER.match(r["module"])
        if by == "layer":
            label = f"{m[0]} ({layer_types[int(m[2])]})" if m and m[1] == "model.layers" else r["module"]
        else:
            module = r["module"]
            if by == "kind" and m and m[1] == "model.layers":
                module = f"{m[1]}.<{layer_types[int(m[2])]}>" + module[len(m[0]):]
            label = module + (f" / ops.{r['op']}" if r["op"] else "")
        acc = out.setdefault(label, [0, 0])
        acc[0] += r["ops"]
        acc[1] += r["host_syncs"]
    return [(label, ops, syncs) for label, (ops, syncs) in out.items()]


# -- one decode step of the in-process engine ------------------------------------------------------

def decode_step(model, batch: int, context: int):
    """A callable running one decode step of `batch` sequences that hold `context` tokens each
    (prefilled here), as bench/model_cpu.py times it: build the ForwardBatch, run forward_batch."""
    from nextserve.model import StaticCache
    cache, seqs = StaticCache(model, batch, context + 2), list(range(batch))
    with torch.inference_mode():
        model.forward_batch(torch.zeros(batch * context, dtype=torch.long), cache.batch(seqs, [context] * batch))
    ids = torch.zeros(batch, dtype=torch.long)

    @torch.inference_mode()
    def step():
        with record_function("ForwardBatch.build"):
            forward = cache.batch(seqs, [1] * batch)
        with record_function("forward_batch"):
            return model.forward_batch(ids, forward)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=128, help="tokens each sequence holds before the step")
    parser.add_argument("--by", choices=("total", "layer", "module", "kind"), default="total")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nextserve.model import Qwen3NextForCausalLM
    model = Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
    for B in args.batch_sizes:
        step = decode_step(model, B, args.context)
        step()  # first-call allocations and lazy inits
        totals = count_step(step)
        print(f"batch {B}: {totals['ops']} ops, {totals['host_syncs']} host syncs {totals['sync_ops']}")
        if args.by == "total":
            continue
        rows = group(breakdown_step(model, step), args.by, model.config.layer_types)
        if args.by == "kind":
            rows = sorted(rows, key=lambda r: -r[1])
        width = max(len(label) for label, *_ in rows)
        print(f"  {'scope':<{width}}{'ops':>7}{'syncs':>7}")
        for label, ops, syncs in rows:
            print(f"  {label:<{width}}{ops:>7}{syncs:>7}")
        print(f"  {'sum':<{width}}{sum(r[1] for r in rows):>7}{sum(r[2] for r in rows):>7}")


if __name__ == "__main__":
    main()
