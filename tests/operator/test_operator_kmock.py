"""The operator end to end against KMock: the real kopf machinery, the real HTTP traffic.

The tests play the cluster's other controllers: they mark workloads ready (kubelet),
and collect owned objects after a deletion (garbage collector).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest


pytestmark = pytest.mark.asyncio

NS = "serving"

STS = "apps/v1/statefulsets"
DEPLOY = "apps/v1/deployments"
CR = "serving.nextserve.io/v1alpha1/qwen3nextdeployments"


def _router_plan(cluster) -> str:
    return cluster.deployments()["demo-router"]["metadata"]["annotations"]["serving.nextserve.io/plan"]


def _worker_args(sts) -> list[str]:
    return sts["spec"]["template"]["spec"]["containers"][0]["args"]


async def test_create_ready_update_reshard_delete(cluster, operator):
    await operator.start()
    body = cluster.make_body()
    uid = body["metadata"]["uid"]
    await cluster.create_cr(body)

    # Creation: plan, two shards of two replicas, router; all owned by the CR.
    await cluster.eventually(lambda: "demo-router" in cluster.deployments(), what="router Deployment")
    sts = cluster.statefulsets()
    assert len(sts) == 2
    assert sorted(_worker_args(s)[_worker_args(s).index("--shard") + 1] for s in sts.values()) == ["0", "1"]
    assert all(s["spec"]["replicas"] == 2 for s in sts.values())
    for objs in (sts, cluster.deployments(), cluster.services(), cluster.configmaps()):
        for obj in objs.values():
            assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    first_plan = _router_plan(cluster)
    assert any(name.endswith(first_plan) for name in cluster.configmaps())

    await cluster.eventually(lambda: cluster.condition("Ready")["reason"] == "NotReady", what="Ready=False NotReady")
    assert cluster.cr()["status"]["phase"] == "Pending"
    assert cluster.condition("WorkersReady")["status"] == "False"
    assert cluster.cr()["status"]["observedGeneration"] == 1

    # The kubelet reports one shard ready: still not ready, and the status says which.
    first = sorted(sts)[0]
    cluster.set_ready(STS, first)
    await cluster.eventually(lambda: cluster.cr()["status"]["shardsReady"] == "1/2", what="1/2 shards")
    assert cluster.condition("Ready")["status"] == "False"
    assert "waiting for shard(s) 1" in cluster.condition("WorkersReady")["message"]

    cluster.ready_all()
    await cluster.eventually(lambda: cluster.condition("Ready")["status"] == "True", what="Ready=True")
    status = cluster.cr()["status"]
    assert status["phase"] == "Ready"
    assert status["routerReplicas"] == "2/2"
    assert status["routerEndpoint"] == f"demo-router.{NS}.svc.cluster.local:50050"
    assert status["plan"]["fingerprint"] == first_plan
    assert [s["experts"] for s in status["shards"]] == ["0-3", "4-7"]
    assert cluster.condition("Progressing")["status"] == "False"

    # A router-only change patches the router in place; workers untouched.
    spec = cluster.small_spec()
    spec["router"]["maxBatchTokens"] = 4096
    await cluster.patch_spec(spec)
    await cluster.eventually(lambda: "--max-batch-tokens" in cluster.deployments()["demo-router"]["spec"]["template"]["spec"]["containers"][0]["args"],
                     what="router args updated")
    assert set(cluster.statefulsets()) == set(sts)

    # Shard-count change: new plan, new workers next to the old ones, router untouched.
    cluster.ready_all()
    spec = cluster.small_spec(shards=4)
    spec["router"]["maxBatchTokens"] = 4096
    await cluster.patch_spec(spec)
    await cluster.eventually(lambda: len(cluster.statefulsets()) == 6, what="4 new StatefulSets next to 2 old")
    await cluster.eventually(lambda: cluster.condition("Progressing")["reason"] == "PlanRollout", what="PlanRollout")
    await asyncio.sleep(0.6)  # a few resync periods: nothing may switch while new shards load
    assert _router_plan(cluster) == first_plan
    assert cluster.condition("Ready")["status"] == "True"   # still serving with the old plan
    assert cluster.condition("Ready")["reason"] == "ServingDuringRollout"
    new_plan = cluster.cr()["status"]["targetPlan"]["fingerprint"]
    assert new_plan != first_plan
    new_sets = [n for n, s in cluster.statefulsets().items() if s["metadata"]["labels"]["serving.nextserve.io/plan"] == new_plan]
    assert len(new_sets) == 4

    for name in new_sets:
        cluster.set_ready(STS, name)
    # New shards ready: the router switches, but the old shards stay until it has rolled out.
    await cluster.eventually(lambda: _router_plan(cluster) == new_plan, what="router switched to the new plan")
    router = cluster.deployments()["demo-router"]
    assert router["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert router["metadata"]["generation"] > router["status"]["observedGeneration"]  # not rolled out yet
    assert len(router["spec"]["template"]["spec"]["containers"][0]["args"]) and \
        sum(1 for a in router["spec"]["template"]["spec"]["containers"][0]["args"] if a == "--worker") == 8
    await asyncio.sleep(0.6)
    assert len(cluster.statefulsets()) == 6

    cluster.set_ready(DEPLOY, "demo-router")
    await cluster.eventually(lambda: len(cluster.statefulsets()) == 4, what="old shards retired")
    assert set(cluster.statefulsets()) == set(new_sets)
    await cluster.eventually(lambda: [n for n in cluster.configmaps() if "-plan-" in n] == [f"demo-plan-{new_plan}"],
                             what="old plan ConfigMap retired")
    await cluster.eventually(lambda: cluster.cr()["status"]["plan"]["fingerprint"] == new_plan and cluster.condition("Ready")["reason"] == "Ready",
                     what="settled on the new plan")
    assert cluster.cr()["status"]["shardsReady"] == "4/4"
    assert cluster.cr()["status"].get("targetPlan") is None

    # Deletion: the operator releases the CR (its timer's finalizer) and owner
    # references let the garbage collector take the children.
    await cluster.delete("serving.nextserve.io/v1alpha1/qwen3nextdeployments", "demo")
    await cluster.eventually(lambda: "demo" not in cluster.objects(CR), what="CR deleted")
    gone = await cluster.garbage_collect(uid)
    assert len(gone) >= 4 + 4 + 2 + 1
    await asyncio.sleep(0.6)  # the operator must not resurrect anything
    assert cluster.statefulsets() == {} and cluster.deployments() == {}


async def test_invalid_specs_build_nothing(cluster, operator):
    await operator.start()

    body = cluster.make_body(spec=cluster.small_spec(shards=3))  # 8 experts over 3 shards, no plan
    await cluster.create_cr(body)
    await cluster.eventually(lambda: cluster.condition("Ready")["reason"] == "ExpertsNotDivisible", what="ExpertsNotDivisible")
    assert "cannot be split evenly over 3 shards" in cluster.condition("Ready")["message"]
    assert cluster.cr()["status"]["phase"] == "Failed"
    assert cluster.statefulsets() == {} and cluster.deployments() == {} and cluster.configmaps() == {}

    # An explicit plan that misses experts 6 and 7.
    await cluster.patch_spec(cluster.small_spec(shards=3, plan=[
        {"shard": 0, "experts": [0, 1]}, {"shard": 1, "experts": [2, 3]}, {"shard": 2, "experts": [4, 5]},
    ]))
    await cluster.eventually(lambda: cluster.condition("Ready")["reason"] == "InvalidPlan", what="InvalidPlan")
    assert "held by no shard: 6, 7" in cluster.condition("Ready")["message"]
    assert cluster.statefulsets() == {}

    # An uneven explicit plan with a replicated expert is fine.
    await cluster.patch_spec(cluster.small_spec(shards=3, plan=[
        {"shard": 0, "experts": [0, 1, 2]}, {"shard": 1, "experts": [2, 3, 4]}, {"shard": 2, "experts": [5, 6, 7]},
    ]))
    await cluster.eventually(lambda: len(cluster.statefulsets()) == 3, what="3 shards from the explicit plan")


def _router_container(cluster) -> dict:
    return cluster.deployments()["demo-router"]["spec"]["template"]["spec"]["containers"][0]


async def test_cache_block_runs_a_redis_for_the_routers_and_removing_it_retires_it(cluster, operator):
    await operator.start()
    spec = cluster.small_spec()
    spec["cache"] = {"managed": {"maxMemory": "256mb"}}
    await cluster.create_cr(cluster.make_body(spec=spec))
    await cluster.eventually(lambda: "demo-router" in cluster.deployments() and "demo-cache" in cluster.deployments(),
                             what="router and managed Redis")
    assert "demo-cache" in cluster.services()
    redis = cluster.deployments()["demo-cache"]["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][redis["args"].index("--maxmemory") + 1] == "256mb"
    router = _router_container(cluster)
    assert router["args"][router["args"].index("--cache-url") + 1] == "$(NEXTSERVE_CACHE_URL)"
    assert {"name": "NEXTSERVE_CACHE_URL", "value": f"redis://demo-cache.{NS}.svc.cluster.local:6379/0"} in router["env"]
    cluster.ready_all()
    await cluster.eventually(lambda: cluster.condition("Ready")["status"] == "True", what="Ready")
    # CacheReady says what the router pods report, not whether the Redis pod is ready: no router pod, no report.
    assert [c["type"] for c in cluster.cr()["status"]["conditions"]] == \
        ["Ready", "WorkersReady", "RouterReady", "Progressing", "Degraded", "CacheReady"]
    assert (cluster.condition("CacheReady")["status"], cluster.condition("CacheReady")["reason"]) == \
        ("Unknown", "NoRouterReady")

    # An external Redis instead: the managed one goes, the router reads the URL from the Secret.
    spec["cache"] = {"managed": None, "urlSecret": {"name": "shared-redis", "key": "redis-url"}}  # a merge patch
    await cluster.patch_spec(spec)
    await cluster.eventually(lambda: "demo-cache" not in cluster.deployments() and "demo-cache" not in cluster.services(),
                             what="managed Redis retired")
    await cluster.eventually(lambda: {"name": "NEXTSERVE_CACHE_URL", "valueFrom": {"secretKeyRef": {
        "name": "shared-redis", "key": "redis-url"}}} in _router_container(cluster)["env"], what="URL from the Secret")

    # No cache block: sessions in each router's memory, no --cache-url.
    spec["cache"] = None
    await cluster.patch_spec(spec)
    await cluster.eventually(lambda: "--cache-url" not in _router_container(cluster)["args"], what="--cache-url gone")
    assert all(e["name"] != "NEXTSERVE_CACHE_URL" for e in _router_container(cluster)["env"])
    # Nothing shared, nothing to report on the resource: the condition goes with the block.
    await cluster.eventually(lambda: cluster.condition("CacheReady") is None, what="CacheReady gone")


async def test_lost_shard_is_degraded(cluster, operator):
    await operator.start()
    await cluster.create_cr(cluster.make_body())
    await cluster.eventually(lambda: "demo-router" in cluster.deployments(), what="router")
    cluster.ready_all()
    await cluster.eventually(lambda: cluster.condition("Ready")["status"] == "True", what="Ready")
    assert [c["type"] for c in cluster.cr()["status"]["conditions"]] == \
        ["Ready", "WorkersReady", "RouterReady", "Progressing", "Degraded"]

    # A ready deployment that loses a shard is Degraded, and says so.
    name = sorted(cluster.statefulsets())[0]
    cluster.set_ready(STS, name, ready=1)
    await cluster.eventually(lambda: cluster.condition("Degraded")["status"] == "True", what="Degraded")
    assert cluster.cr()["status"]["phase"] == "Degraded"
    assert cluster.condition("Ready")["status"] == "False"
    assert "1/2 shards ready" in cluster.condition("Ready")["message"]


async def test_resync_without_change_writes_nothing(cluster, operator):
    """Every child is written once; resyncs that find nothing to change only read."""
    await operator.start()
    await cluster.create_cr(cluster.make_body())
    await cluster.eventually(lambda: "demo-router" in cluster.deployments(), what="router")
    cluster.ready_all()
    await cluster.eventually(lambda: cluster.condition("Ready")["status"] == "True", what="Ready")
    await asyncio.sleep(0.5)  # let the pass that saw Ready finish

    def child_writes():
        return [r for r in cluster.kmock if r.method in ("PATCH", "POST", "PUT")
                and r.resource is not None and r.resource.plural != "qwen3nextdeployments"
                and not r.resource.group.startswith("kopf")]

    def status_writes():
        return [r for r in cluster.kmock if r.method == "PATCH" and r.resource is not None
                and r.resource.plural == "qwen3nextdeployments" and r.subresource == "status"]

    before, status_before = len(child_writes()), len(status_writes())
    resyncs_before = len([r for r in cluster.kmock if r.method == "GET" and r.name == "demo-router"])
    await asyncio.sleep(1.0)  # five resync periods
    resyncs = len([r for r in cluster.kmock if r.method == "GET" and r.name == "demo-router"]) - resyncs_before
    assert resyncs >= 3, "the resync timer did not run"
    assert len(child_writes()) == before, [f"{r.method} {r.resource.plural}/{r.name or ''}" for r in child_writes()[before:]]
    assert len(status_writes()) == status_before  # the same status is not written again

    # Someone scales the router by hand: no spec change, so the operator leaves it alone.
    cluster.kmock.objects[DEPLOY, NS, "demo-router"].patch({"spec": {"replicas": 5}})
    await asyncio.sleep(0.6)
    assert cluster.deployments()["demo-router"]["spec"]["replicas"] == 5
    assert len(child_writes()) == before

    # A spec change writes exactly the children it changes.
    spec = cluster.small_spec()
    spec["router"]["maxBatchTokens"] = 4096
    await cluster.patch_spec(spec)
    await cluster.eventually(lambda: "--max-batch-tokens" in cluster.deployments()["demo-router"]["spec"]["template"]["spec"]["containers"][0]["args"],
                             what="router args updated")
    await asyncio.sleep(0.6)
    changed = {r.name for r in child_writes()[before:]}
    assert changed == {"demo-router"}, changed


async def test_restart_resumes_idempotently(cluster, operator):
    await operator.start()
    await cluster.create_cr(cluster.make_body())
    await cluster.eventually(lambda: "demo-router" in cluster.deployments(), what="router")
    cluster.ready_all()
    await cluster.eventually(lambda: cluster.condition("Ready")["status"] == "True", what="Ready")
    await operator.stop()

    # While the operator is down: the router is lost and the spec changes.
    names_before = set(cluster.statefulsets())
    await cluster.delete(DEPLOY, "demo-router")
    spec = cluster.small_spec()
    spec["router"]["replicas"] = 3
    await cluster.patch_spec(spec)
    assert "demo-router" not in cluster.deployments()

    await operator.start()
    await cluster.eventually(lambda: cluster.deployments().get("demo-router", {}).get("spec", {}).get("replicas") == 3,
                     what="router recreated with the new spec")
    assert set(cluster.statefulsets()) == names_before  # nothing duplicated
    await cluster.eventually(lambda: cluster.condition("RouterReady")["status"] == "False", what="RouterReady=False")
    cluster.set_ready(DEPLOY, "demo-router")
    await cluster.eventually(lambda: cluster.condition("Ready")["status"] == "True" and cluster.cr()["status"]["observedGeneration"] == 2,
                     what="Ready at generation 2")



async def test_peering_replica_works_through_peering_object(cluster, operator):
    """With peering (as the chart runs it), the replica registers in the ClusterKopfPeering
    object and serves deployments."""
    cluster.kmock.objects["kopf.dev/v1/clusterkopfpeerings", None, "nextserve"] = {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
        "metadata": {"name": "nextserve", "uid": "peering-uid", "resourceVersion": "1"}}
    operator.argv = ["--all-namespaces", "--peering", "nextserve", "--resync-seconds", "0.2", "--liveness", ""]
    await operator.start()
    await cluster.create_cr(cluster.make_body())
    await cluster.eventually(lambda: "demo-router" in cluster.deployments(), what="router")
    peering = cluster.kmock.objects["kopf.dev/v1/clusterkopfpeerings", None, "nextserve"].raw
    assert peering.get("status"), "the operator did not announce itself in the peering object"


async def test_missing_peering_object_is_a_warning_with_the_remedy_and_in_healthz(cluster, operator, caplog):
    """An operator told to peer through an object that does not exist says so, never waits silently."""
    port = free_port()
    operator.argv = ["--all-namespaces", "--peering", "nextserve", "--resync-seconds", "0.2",
                     "--liveness", f"http://127.0.0.1:{port}/healthz"]
    with caplog.at_level(logging.WARNING, logger="nextserve.operator"):
        await operator.start()
        await cluster.eventually(lambda: any("does not exist" in r.getMessage() for r in caplog.records),
                                 what="a warning about the missing peering object")
    message = next(r.getMessage() for r in caplog.records if "does not exist" in r.getMessage())
    assert "ClusterKopfPeering 'nextserve'" in message and "--peering ''" in message
    async with cluster.session.get(f"http://127.0.0.1:{port}/healthz") as resp:
        report = await resp.json()
    assert report["operator"]["problems"] == [message]
    # And it does wait: nothing is reconciled without the peering.
    await cluster.create_cr(cluster.make_body())
    await asyncio.sleep(1.0)
    assert cluster.deployments() == {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_rbac_denial_is_a_warning_with_the_remedy_and_in_healthz(cluster, operator, caplog):
    import kmock as kmock_lib

    denied = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
              "message": 'statefulsets.apps "x" is forbidden: User "system:serviceaccount:ops:op" cannot get resource'}
    cluster.kmock[kmock_lib.action.FETCH, kmock_lib.resource("apps/v1/statefulsets")] << 403 << denied
    port = free_port()
    operator.argv = ["--all-namespaces", "--resync-seconds", "0.2", "--liveness", f"http://127.0.0.1:{port}/healthz"]
    with caplog.at_level(logging.WARNING, logger="nextserve.operator"):
        await operator.start()
        await cluster.create_cr(cluster.make_body())
        await cluster.eventually(lambda: any("RBAC denies" in r.getMessage() for r in caplog.records),
                                 what="a warning about RBAC")
    message = next(r.getMessage() for r in caplog.records if "RBAC denies" in r.getMessage())
    assert "cannot get resource" in message and "templates/rbac.yaml" in message
    async with cluster.session.get(f"http://127.0.0.1:{port}/healthz") as resp:
        report = await resp.json()
    assert report["operator"] == {"role": "standalone", "problems": [message]}


HPA = "autoscaling/v2/horizontalpodautoscalers"


async def test_router_autoscaling_hands_replicas_to_an_hpa_and_back(cluster, operator):
    await operator.start()
    spec = cluster.small_spec()
    spec["router"]["autoscaling"] = {"minReplicas": 2, "maxReplicas": 5, "sequencesPerRouter": 16}
    body = cluster.make_body(spec=spec)
    await cluster.create_cr(body)
    await cluster.eventually(lambda: "demo-router" in cluster.objects(HPA), what="router HPA")
    hpa = cluster.objects(HPA)["demo-router"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "demo-router" and hpa["spec"]["maxReplicas"] == 5
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    await cluster.eventually(lambda: "demo-router" in cluster.deployments(), what="router")

    def router_writes():
        return [r for r in cluster.kmock if r.method in ("PATCH", "POST") and r.resource is not None
                and r.resource.plural == "deployments" and (r.data or {}).get("metadata", {}).get("name") == "demo-router"]

    assert router_writes() and all("replicas" not in r.data["spec"] for r in router_writes())

    # The HPA controller scales the router; a spec change rewrites the router without replicas.
    cluster.kmock.objects[DEPLOY, NS, "demo-router"].patch({"spec": {"replicas": 4}})
    spec["router"]["maxBatchTokens"] = 2048
    writes_before = len(router_writes())
    await cluster.patch_spec(spec)
    await cluster.eventually(lambda: "--max-batch-tokens" in cluster.deployments()["demo-router"]["spec"]["template"]
                             ["spec"]["containers"][0]["args"], what="router args updated")
    assert len(router_writes()) > writes_before and all("replicas" not in r.data["spec"] for r in router_writes())
    assert cluster.deployments()["demo-router"]["spec"]["replicas"] == 4

    # Autoscaling off: the HPA goes, and the operator owns replicas again.
    del spec["router"]["autoscaling"]
    await cluster.patch_spec({**spec, "router": {**spec["router"], "autoscaling": None}})
    await cluster.eventually(lambda: "demo-router" not in cluster.objects(HPA), what="HPA deleted")
    await cluster.eventually(lambda: cluster.deployments()["demo-router"]["spec"]["replicas"] == 2,
                             what="replicas from the spec")
