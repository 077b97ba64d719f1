"""One reconciliation pass: observe children, apply what the spec asks, report status.

Level-based and idempotent: every pass recomputes the desired children from the spec and
the observed state, so a pass after an operator restart, a missed event or a crash half
way through converges to the same result.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from nextserve.operator import manifests as m
from nextserve.operator import router_probe
from nextserve.operator import spec as s
from nextserve.operator import status as st
from nextserve.operator.kube import Kube
from nextserve.worker.plan import ExpertPlan


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def reconcile(api: Kube, body: Mapping[str, Any], now: str | None = None,
                    old_status: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Bring the children in line with `body` and return the new status.

    `old_status` is the last status this process wrote, when it knows it: a handler may
    start with a body read before that status landed, and conditions that depend on
    history (Degraded, transition times) must not be computed from an older one."""
    now = now or _now()
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    generation = meta.get("generation")
    old_status = old_status if old_status is not None else (body.get("status") or {})

    try:
        spec = s.parse_spec(body.get("spec") or {})
        target = s.resolve_plan(spec)
    except s.InvalidSpec as exc:
        # Nothing is created or changed for a spec that cannot work; what already runs
        # (from an earlier valid spec) keeps running.
        return st.invalid_status(generation, exc.reason, exc.message, old_status, now)

    fp = target.fingerprint()
    target_cm = m.plan_configmap_name(name, target)
    selector = {m.LABEL_DEPLOYMENT: m.label_value(name)}

    # Workers and plan of the target first: they are additive and never disturb serving.
    for child in m.worker_children(body, spec, target):
        await api.apply(child)

    workers = await api.list("StatefulSet", namespace, {**selector, m.COMPONENT: "worker"})
    target_sets = {
        int(w["metadata"]["labels"][m.LABEL_SHARD]): w
        for w in workers if w["metadata"]["labels"].get(m.LABEL_PLAN) == fp
    }
    target_ready = all(st.statefulset_ready(target_sets.get(i))[2] for i in target.shard_indices)

    # The managed Redis before the router that points at it; gone when the CR no longer asks for it.
    cache = m.cache_children(body, spec)
    for child in cache:
        await api.apply(child)
    if not cache:
        for kind in ("Deployment", "Service"):
            for obj in await api.list(kind, namespace, {**selector, m.COMPONENT: "cache"}):
                await api.delete(kind, namespace, obj["metadata"]["name"])

    router = await api.get("Deployment", namespace, m.router_name(name))
    router_plan = ((router or {}).get("metadata", {}).get("annotations") or {}).get(m.ANNOTATION_PLAN)
    step = st.decide_rollout(fp, router_plan, target_ready, st.deployment_ready(router)[2])

    if step.patch_router:
        for child in m.router_children(body, spec, target):
            await api.apply(child)
        router = await api.get("Deployment", namespace, m.router_name(name))
    else:
        await api.apply(m.router_service(body, spec))
    await api.apply(m.router_disruption_budget(body, spec))
    await _autoscaler(api, body, spec)

    if step.retire_old:
        await _retire(api, namespace, selector, keep=fp)

    # The plan the router serves with, and whether its workers are all up.
    in_force_fp = step.router_plan if router is not None else None
    in_force: dict[str, Any] | None = None
    in_force_ready = False
    if in_force_fp == fp:
        in_force = st.plan_ref(target, target_cm)
        in_force_ready = target_ready
    elif in_force_fp is not None:
        old_sets = [w for w in workers if w["metadata"]["labels"].get(m.LABEL_PLAN) == in_force_fp]
        old_cms = await api.list("ConfigMap", namespace, {**selector, m.LABEL_PLAN: in_force_fp})
        if old_cms:
            old_plan = ExpertPlan.from_json(old_cms[0]["data"][m.PLAN_FILE])
            in_force = st.plan_ref(old_plan, old_cms[0]["metadata"]["name"])
            in_force_ready = len(old_sets) == old_plan.num_shards and all(st.statefulset_ready(w)[2] for w in old_sets)

    # Only a shared cache has something to report on the resource; each router's own memory tier does not.
    cache_reports = None
    if spec.cache is not None:
        pods = await api.list("Pod", namespace, m.selector_labels(name, "router"))
        cache_reports = await router_probe.ask_routers(pods)

    return st.compute_status(
        generation=generation,
        target=target,
        target_configmap=target_cm,
        in_force=in_force,
        shard_sets=target_sets,
        in_force_ready=in_force_ready,
        router=router,
        endpoint=m.router_endpoint(name, namespace, spec),
        old=old_status,
        now=now,
        cache_reports=cache_reports,
    )


async def _autoscaler(api: Kube, body: Mapping[str, Any], spec: s.DeploymentSpec) -> None:
    """The router's HPA when the spec asks for one; deleted when it no longer does."""
    if spec.router.autoscaling is not None:
        await api.apply(m.router_autoscaler(body, spec))
        return
    meta = body["metadata"]
    if await api.get("HorizontalPodAutoscaler", meta["namespace"], m.router_name(meta["name"])) is not None:
        await api.delete("HorizontalPodAutoscaler", meta["namespace"], m.router_name(meta["name"]))


async def _retire(api: Kube, namespace: str, selector: dict[str, str], keep: str) -> None:
    """Delete workers, their Services, budgets and plan ConfigMaps of every plan but `keep`."""
    for kind, component in (("StatefulSet", "worker"), ("Service", "worker"), ("PodDisruptionBudget", "worker"),
                            ("ConfigMap", "plan")):
        for obj in await api.list(kind, namespace, {**selector, m.COMPONENT: component}):
            labels = obj["metadata"].get("labels") or {}
            if labels.get(m.LABEL_PLAN) != keep:
                await api.delete(kind, namespace, obj["metadata"]["name"])
