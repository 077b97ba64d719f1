"""Pure status computation: observed children in, the custom resource's status out.

Also the rollout decision for plan changes, which depends on the same readiness facts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from nextserve.worker.plan import ExpertPlan

# CacheReady only with a shared cache (spec.cache): what the routers report about it, never whether
# a Redis pod is ready (a ready Redis the routers cannot reach is no cache).
CONDITION_TYPES = ("Ready", "WorkersReady", "RouterReady", "Progressing", "Degraded", "CacheReady")


# -- readiness of single children ---------------------------------------------------------

def _generation_observed(obj: Mapping[str, Any]) -> bool:
    generation = (obj.get("metadata") or {}).get("generation")
    observed = (obj.get("status") or {}).get("observedGeneration")
    if generation is None:
        return True
    return observed is not None and observed >= generation


def statefulset_ready(sts: Mapping[str, Any] | None) -> tuple[int, int, bool]:
    """(ready replicas, desired replicas, fully ready)."""
    if not sts:
        return 0, 0, False
    desired = int((sts.get("spec") or {}).get("replicas", 1))
    status = sts.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    updated = status.get("updatedReplicas")
    current = updated is None or int(updated) >= desired
    return ready, desired, ready >= desired and current and _generation_observed(sts)


def deployment_ready(dep: Mapping[str, Any] | None) -> tuple[int, int, bool]:
    """(ready replicas, desired replicas, rolled out and fully ready)."""
    if not dep:
        return 0, 0, False
    desired = int((dep.get("spec") or {}).get("replicas", 1))
    status = dep.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    return ready, desired, ready >= desired and updated >= desired and _generation_observed(dep)


# -- plan rollout ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RolloutStep:
    router_plan: str          # fingerprint the router Deployment should serve with
    patch_router: bool        # False: leave the router Deployment exactly as it is
    retire_old: bool          # True: delete workers and plans other than the target's


def decide_rollout(target: str, router_plan: str | None, target_workers_ready: bool, router_settled: bool) -> RolloutStep:
    """Switch the router to a new plan only once that plan's workers are all ready,
    and retire the old plan's workers only once the switched router is rolled out.
    The router Deployment surges new pods before old ones go (maxUnavailable 0), so at
    every step some router serves with a plan whose workers are running."""
    if router_plan is None:
        # First creation: nothing serves yet, so nothing can be interrupted.
        return RolloutStep(router_plan=target, patch_router=True, retire_old=False)
    if router_plan == target:
        return RolloutStep(router_plan=target, patch_router=True, retire_old=router_settled)
    if target_workers_ready:
        return RolloutStep(router_plan=target, patch_router=True, retire_old=False)
    return RolloutStep(router_plan=router_plan, patch_router=False, retire_old=False)


# -- the status document ----------------------------------------------------------------

def expert_ranges(experts: Sequence[int], limit: int = 6) -> str:
    """[0,1,2,3,8,9] -> '0-3,8-9' (abbreviated after `limit` ranges)."""
    ranges: list[str] = []
    items = sorted(set(experts))
    start = prev = None
    for e in items + [None]:
        if start is None:
            start = prev = e
        elif e is not None and e == prev + 1:
            prev = e
        else:
            ranges.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = e
    if len(ranges) > limit:
        return ",".join(ranges[:limit]) + f",... ({len(items)} experts)"
    return ",".join(ranges)


def condition(type_: str, ok: bool | None, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "Unknown" if ok is None else ("True" if ok else "False"),
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def stamp_transitions(new: list[dict[str, Any]], old: Sequence[Mapping[str, Any]] | None, now: str) -> list[dict[str, Any]]:
    """Keep lastTransitionTime when a condition's status did not change."""
    previous = {c.get("type"): c for c in (old or [])}
    out = []
    for cond in new:
        before = previous.get(cond["type"])
        if before and before.get("status") == cond["status"] and before.get("lastTransitionTime"):
            stamp = before["lastTransitionTime"]
        else:
            stamp = now
        out.append({**cond, "lastTransitionTime": stamp})
    return out


def _was_ready(old: Sequence[Mapping[str, Any]] | None) -> bool:
    for c in old or []:
        if c.get("type") in ("Ready", "Degraded") and c.get("status") == "True":
            return True
    return False


def invalid_status(generation: int | None, reason: str, message: str, old: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    """A spec that cannot be deployed: say why, keep what is known about the children."""
    old = old or {}
    unknown = f"not evaluated: the spec is invalid ({reason})"
    conditions = [
        condition("Ready", False, reason, message, generation),
        condition("WorkersReady", None, reason, unknown, generation),
        condition("RouterReady", None, reason, unknown, generation),
        condition("Progressing", False, reason, "nothing is rolled out until the spec is fixed", generation),
        condition("Degraded", False, reason, unknown, generation),
    ]
    return {
        "observedGeneration": generation,
        "phase": "Failed",
        "conditions": stamp_transitions(conditions, old.get("conditions"), now),
    }


def plan_ref(plan: ExpertPlan, configmap: str) -> dict[str, Any]:
    return {
        "fingerprint": plan.fingerprint(),
        "configMap": configmap,
        "numShards": plan.num_shards,
        "numExperts": plan.num_experts,
    }


# -- the shared cache, as the routers report it -------------------------------------------

SHARED_TIER = "redis"   # in ModelInfo's CacheStatus.tiers ("local+redis", serving.proto) when --cache-url is set
NAMED_REPLICAS = 4      # replicas named in a message; the rest are counted
SERVING_WITHOUT_CACHE = ("Ready does not depend on it: requests are served, computing what the cache misses, "
                         "and continuing a stored session answers UNAVAILABLE until Redis works again")


@dataclasses.dataclass(frozen=True)
class RouterCacheReport:
    """What one ready router pod said about its cache (gRPC ModelInfo), or why it could not be asked."""
    pod: str
    tiers: str = ""             # e.g. "local+redis"
    degraded: bool = False
    reason: str = ""            # the router's own words for what is wrong
    error: str | None = None    # set: the router was not asked, or did not answer

    @property
    def problem(self) -> str | None:
        """Why this router's shared tier does not work (None: it works, or the router was not asked)."""
        if self.error is not None:
            return None
        if SHARED_TIER not in self.tiers.split("+"):
            return f"uses no shared tier (its cache tiers are {self.tiers or 'unset'!r})"
        if self.degraded:
            return self.reason or "degraded (the router gave no reason)"
        return None


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:NAMED_REPLICAS])
    return shown + (f"; and {len(items) - NAMED_REPLICAS} more" if len(items) > NAMED_REPLICAS else "")


def cache_condition(reports: Sequence[RouterCacheReport], generation: int | None) -> dict[str, Any]:
    """CacheReady from one report per ready router replica: True only when every one of them
    reports its shared tier working."""
    if not reports:
        return condition("CacheReady", None, "NoRouterReady",
                         "no router replica is ready yet to report on the shared cache", generation)
    broken = [f"{r.pod}: {r.problem}" for r in reports if r.problem]
    unasked = [f"{r.pod}: {r.error}" for r in reports if r.error is not None]
    working = len(reports) - len(broken) - len(unasked)
    counted = f"{working}/{len(reports)} ready router replicas report the shared cache working"
    if broken:
        also = f"; not asked: {_listing(unasked)}" if unasked else ""
        return condition("CacheReady", False, "CacheDegraded",
                         f"{counted}; {_listing(broken)}{also}. {SERVING_WITHOUT_CACHE}", generation)
    if unasked:
        return condition("CacheReady", None, "CacheUnreachable",
                         f"{counted}; could not ask {_listing(unasked)}", generation)
    return condition("CacheReady", True, "CacheWorking",
                     f"every ready router replica ({len(reports)}) reports the shared cache (Redis) working", generation)


def compute_status(
    *,
    generation: int | None,
    target: ExpertPlan,
    target_configmap: str,
    in_force: dict[str, Any] | None,
    shard_sets: Mapping[int, Mapping[str, Any] | None],
    in_force_ready: bool,
    router: Mapping[str, Any] | None,
    endpoint: str,
    old: Mapping[str, Any] | None,
    now: str,
    cache_reports: Sequence[RouterCacheReport] | None = None,
) -> dict[str, Any]:
    """The whole status.  `shard_sets` maps the target plan's shards to their StatefulSets;
    `in_force` is plan_ref() of the plan the router serves with (None before a router
    exists); `in_force_ready` says whether that plan's workers are all ready;
    `cache_reports` has one report per ready router pod, None without a shared cache."""
    old = old or {}
    shards = []
    for shard in target.shard_indices:
        ready, desired, ok = statefulset_ready(shard_sets.get(shard))
        shards.append({
            "shard": shard,
            "experts": expert_ranges(target.experts_of(shard)),
            "replicas": desired,
            "readyReplicas": ready,
            "ready": ok,
        })
    ready_shards = sum(1 for s in shards if s["ready"])
    workers_ok = ready_shards == len(shards)
    not_ready = [str(s["shard"]) for s in shards if not s["ready"]]
    workers = condition(
        "WorkersReady", workers_ok,
        "AllShardsReady" if workers_ok else "ShardsNotReady",
        f"{ready_shards}/{len(shards)} shards ready"
        + ("" if workers_ok else f"; waiting for shard(s) {', '.join(not_ready[:8])}{' ...' if len(not_ready) > 8 else ''}"),
        generation,
    )

    r_ready, r_desired, router_ok = deployment_ready(router)
    router_plan = (in_force or {}).get("fingerprint")
    if router is None:
        router_cond = condition("RouterReady", False, "RouterMissing", "the router Deployment does not exist yet", generation)
    elif router_ok:
        router_cond = condition("RouterReady", True, "RouterAvailable", f"{r_ready}/{r_desired} router replicas ready", generation)
    else:
        router_cond = condition("RouterReady", False, "RouterNotReady", f"{r_ready}/{r_desired} router replicas ready and updated", generation)

    rolling = router_plan is not None and router_plan != target.fingerprint()
    # Serving now: routers are up with a plan whose workers are all up.
    serving = r_ready > 0 and in_force_ready
    fully = workers_ok and router_ok and not rolling
    ready_cond = condition(
        "Ready", serving and (fully or rolling),
        "Ready" if fully else ("ServingDuringRollout" if serving and rolling else "NotReady"),
        "all shards and routers are ready" if fully else (
            "serving with the previous plan while the new plan rolls out" if serving and rolling
            else "; ".join(c["message"] for c in (workers, router_cond) if c["status"] != "True")
        ),
        generation,
    )

    if rolling:
        progressing = condition("Progressing", True, "PlanRollout",
                                f"moving the router from plan {router_plan} to plan {target.fingerprint()} "
                                f"({ready_shards}/{len(shards)} new shards ready)", generation)
    elif not fully:
        progressing = condition("Progressing", True, "RollingOut", "waiting for children to become ready", generation)
    else:
        progressing = condition("Progressing", False, "Settled", "the deployment matches its spec", generation)

    degraded_now = not fully and _was_ready(old.get("conditions")) and not (serving and rolling)
    degraded = condition(
        "Degraded", degraded_now,
        "ComponentsNotReady" if degraded_now else "AsExpected",
        ready_cond["message"] if degraded_now else "no ready component was lost",
        generation,
    )

    if degraded_now:
        phase = "Degraded"
    elif fully:
        phase = "Ready"
    elif rolling or r_ready or ready_shards:
        phase = "Progressing"
    else:
        phase = "Pending"

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": phase,
        "shardsReady": f"{ready_shards}/{len(shards)}",
        "routerReplicas": f"{r_ready}/{r_desired}",
        "routerEndpoint": endpoint,
        "shards": shards,
        "plan": in_force,
        "targetPlan": plan_ref(target, target_configmap) if rolling else None,
        "conditions": stamp_transitions(
            [ready_cond, workers, router_cond, progressing, degraded]
            + ([cache_condition(cache_reports, generation)] if cache_reports is not None else []),
            old.get("conditions"), now,
        ),
    }
    return status
