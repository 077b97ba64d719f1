"""CacheReady from what the router pods report, and which pods are asked where: plain data in,
the condition out; and the probe against a port where no router listens (a real gRPC call)."""

from __future__ import annotations

import socket

import pytest

from nextserve.operator import router_probe as rp
from nextserve.operator import status as st
from nextserve.worker.plan import ExpertPlan

Report = st.RouterCacheReport
UNREACHABLE = "Redis unreachable on read (ConnectionError: Error 111 connecting to cache:6379); serving without it"


def ok(pod: str) -> Report:
    return Report(pod, tiers="local+redis")


@pytest.mark.parametrize("reports, status, reason, says", [
    ([], "Unknown", "NoRouterReady", ["no router replica is ready yet"]),
    ([ok("r-a"), ok("r-b")], "True", "CacheWorking", ["every ready router replica (2) reports"]),
    ([ok("r-a"), Report("r-b", tiers="local+redis", degraded=True, reason=UNREACHABLE)],
     "False", "CacheDegraded", ["1/2 ready router replicas", f"r-b: {UNREACHABLE}", "Ready does not depend on it"]),
    # A router without --cache-url (e.g. one from before the cache block, still rolling) shares nothing.
    ([ok("r-a"), Report("r-old", tiers="local")], "False", "CacheDegraded",
     ["r-old: uses no shared tier (its cache tiers are 'local')"]),
    ([Report("r-a", tiers="local+redis", degraded=True)], "False", "CacheDegraded",
     ["r-a: degraded (the router gave no reason)"]),
    ([ok("r-a"), Report("r-b", error="ModelInfo at 10.0.0.7:50050 failed: UNAVAILABLE: connection refused")],
     "Unknown", "CacheUnreachable", ["1/2 ready router replicas", "could not ask r-b: ModelInfo at 10.0.0.7:50050"]),
    ([Report("r-a", error="the pod has no IP or no container port named grpc")], "Unknown", "CacheUnreachable",
     ["0/1", "r-a: the pod has no IP"]),
    # What is known to be broken wins over what is not known.
    ([Report("r-a", tiers="local+redis", degraded=True, reason=UNREACHABLE), Report("r-b", error="timed out")],
     "False", "CacheDegraded", [f"r-a: {UNREACHABLE}", "not asked: r-b: timed out"]),
], ids=["no-router", "all-working", "one-degraded", "one-without-redis", "no-reason", "one-unasked", "all-unasked",
        "degraded-and-unasked"])
def test_cache_condition_from_reports(reports, status, reason, says):
    cond = st.cache_condition(reports, generation=3)
    assert (cond["type"], cond["status"], cond["reason"], cond["observedGeneration"]) == ("CacheReady", status, reason, 3)
    for words in says:
        assert words in cond["message"]


def test_a_message_names_a_few_replicas_and_counts_the_rest():
    reports = [Report(f"r-{i}", tiers="local+redis", degraded=True, reason="Redis timed out") for i in range(7)]
    message = st.cache_condition(reports, 1)["message"]
    assert "0/7 ready router replicas" in message
    assert all(f"r-{i}:" in message for i in range(st.NAMED_REPLICAS))
    assert f"r-{st.NAMED_REPLICAS}:" not in message and f"and {7 - st.NAMED_REPLICAS} more" in message


def _status(cache_reports, old=None, now="2026-01-01T00:00:00Z"):
    plan = ExpertPlan.contiguous(8, 2)
    ready_sts = {"spec": {"replicas": 1}, "status": {"readyReplicas": 1, "updatedReplicas": 1}}
    router = {"spec": {"replicas": 2}, "status": {"readyReplicas": 2, "updatedReplicas": 2}}
    return st.compute_status(
        generation=1, target=plan, target_configmap="demo-plan", in_force=st.plan_ref(plan, "demo-plan"),
        shard_sets={0: ready_sts, 1: ready_sts}, in_force_ready=True, router=router, endpoint="demo-router:50050",
        old=old, now=now, cache_reports=cache_reports)


def _cond(status, type_):
    return next((c for c in status["conditions"] if c["type"] == type_), None)


def test_cache_ready_is_there_only_with_a_shared_cache_and_never_changes_ready():
    without = _status(None)
    assert [c["type"] for c in without["conditions"]] == list(st.CONDITION_TYPES[:-1])

    working = _status([ok("r-a"), ok("r-b")])
    assert [c["type"] for c in working["conditions"]] == list(st.CONDITION_TYPES)
    assert _cond(working, "CacheReady")["status"] == "True"

    degraded = _status([ok("r-a"), Report("r-b", tiers="local+redis", degraded=True, reason=UNREACHABLE)],
                       old=working, now="2026-01-01T00:05:00Z")
    assert _cond(degraded, "CacheReady")["status"] == "False"
    # A degraded cache serves correctly: Ready, Degraded and the phase stay as they were.
    assert [_cond(degraded, t)["status"] for t in ("Ready", "Degraded")] == ["True", "False"]
    assert degraded["phase"] == "Ready"
    # Transition times as for the other conditions: only a status change moves them.
    assert _cond(degraded, "CacheReady")["lastTransitionTime"] == "2026-01-01T00:05:00Z"
    assert _cond(degraded, "Ready")["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    still = _status([ok("r-a"), Report("r-b", tiers="local+redis", degraded=True, reason=UNREACHABLE)],
                    old=degraded, now="2026-01-01T00:06:00Z")
    assert _cond(still, "CacheReady")["lastTransitionTime"] == "2026-01-01T00:05:00Z"


def pod(name="demo-router-7c9d-x2k4q", ip="10.1.2.3", ready="True", ports=({"name": "grpc", "containerPort": 50050},),
        terminating=False):
    return {
        "metadata": {"name": name, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if terminating else {})},
        "spec": {"containers": [{"name": "router", "ports": [{"name": "metrics", "containerPort": 9400}, *ports]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
    }


def test_which_router_pods_are_asked_and_where():
    assert rp.pod_ready(pod()) and rp.grpc_address(pod()) == "10.1.2.3:50050"
    assert not rp.pod_ready(pod(ready="False"))
    assert not rp.pod_ready(pod(terminating=True))  # draining: about to go
    assert not rp.pod_ready({"metadata": {"name": "pending"}, "status": {}})
    assert rp.grpc_address(pod(ip="fd00::17")) == "[fd00::17]:50050"
    assert rp.grpc_address(pod(ports=())) is None
    assert rp.grpc_address(pod(ip=None)) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.asyncio
async def test_routers_that_do_not_answer_are_reports_not_errors():
    port = _closed_port()
    pods = [pod("r-b", ip="127.0.0.1", ports=({"name": "grpc", "containerPort": port},)),
            pod("r-a", ip="127.0.0.1", ports=()), pod("r-c", ready="False")]
    reports = await rp.ask_routers(pods, timeout=2.0)
    assert [r.pod for r in reports] == ["r-a", "r-b"]  # ready pods only, by name
    assert reports[0].error == "the pod has no IP or no container port named grpc"
    assert reports[1].error.startswith(f"ModelInfo at 127.0.0.1:{port} failed: UNAVAILABLE")
    assert st.cache_condition(reports, 1)["reason"] == "CacheUnreachable"


def test_printer_columns_name_conditions_the_operator_writes(crd):
    import re
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    named = {m.group(1) for c in columns for m in [re.search(r'@\.type=="(\w+)"', c["jsonPath"])] if m}
    assert named == {"Ready", "CacheReady"} and named <= set(st.CONDITION_TYPES)
