"""The expert plan: which worker shard holds which MoE experts.

The plan is shared by three parties that never talk about it directly: the operator
writes it into a ConfigMap, the router reads it to know where to send each expert's
tokens, and every worker reads it to know which expert weights to load.  It is a
small JSON document::

    {"version": 1, "num_experts": E, "shards": [{"shard": 0, "experts": [0, 1, ...]}, ...]}

The serialisation is canonical (sorted keys, sorted shards and experts, no spaces) so
the same plan always produces the same bytes and therefore the same fingerprint; the
operator names the plan ConfigMap after that fingerprint to roll out a new plan next to
the old one.

This module must stay free of heavy imports (no torch): the operator imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PLAN_VERSION = 1


def _abbreviate(numbers: Iterable[int], limit: int = 8) -> str:
    """Render a list of ints for an error message without flooding it (512 experts)."""
    items = sorted(numbers)
    shown = ", ".join(str(n) for n in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items)} in all)"
    return shown


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    shard: int
    experts: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """An assignment of experts to shards.

    An expert may be held by more than one shard (a replicated hot expert); every
    expert must be held by at least one.  Shards need not be the same size.
    """

    num_experts: int
    shards: tuple[ShardPlan, ...]

    # -- construction -------------------------------------------------------------

    @classmethod
    def contiguous(cls, num_experts: int, num_shards: int) -> ExpertPlan:
        """Shard i holds experts [i*k, (i+1)*k) with k = num_experts / num_shards.

        Requires divisibility: an uneven split is a load-balancing decision that the
        caller must make explicitly with an explicit plan.
        """
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if num_experts % num_shards:
            raise ValueError(
                f"{num_experts} experts cannot be split evenly over {num_shards} shards; "
                "choose a shard count that divides the expert count or give an explicit plan"
            )
        per = num_experts // num_shards
        shards = tuple(
            ShardPlan(shard=i, experts=tuple(range(i * per, (i + 1) * per))) for i in range(num_shards)
        )
        return cls(num_experts=num_experts, shards=shards)

    @classmethod
    def from_mapping(cls, num_experts: int, shards: Mapping[int, Sequence[int]] | Sequence[Mapping[str, Any]]) -> ExpertPlan:
        """Build from {shard: [experts]} or [{"shard": s, "experts": [...]}]; normalises order."""
        if isinstance(shards, Mapping):
            items = [(int(s), list(e)) for s, e in shards.items()]
        else:
            items = [(int(entry["shard"]), list(entry["experts"])) for entry in shards]
        return cls(
            num_experts=int(num_experts),
            shards=tuple(
                ShardPlan(shard=s, experts=tuple(sorted(int(e) for e in experts)))
                for s, experts in sorted(items, key=lambda item: item[0])
            ),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ExpertPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expert plan is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("expert plan must be a JSON object")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ValueError(f"unsupported expert plan version {version!r} (expected {PLAN_VERSION})")
        for key in ("num_experts", "shards"):
            if key not in data:
                raise ValueError(f"expert plan lacks the field {key!r}")
        if not isinstance(data["shards"], list):
            raise ValueError("expert plan field 'shards' must be a list")
        try:
            plan = cls.from_mapping(data["num_experts"], data["shards"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed expert plan: {exc!r}") from exc
        plan.validate()
        return plan

    # -- serialisation ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "num_experts": self.num_experts,
            "shards": [
                {"shard": s.shard, "experts": sorted(set(s.experts))}
                for s in sorted(self.shards, key=lambda s: s.shard)
            ],
        }

    def to_json(self) -> str:
        """Canonical bytes-stable JSON: equal plans serialise identically."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self, length: int = 10) -> str:
        """A short sha256 of the canonical JSON; safe inside Kubernetes object names."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:length]

    # -- checks and queries -------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming what is wrong; return None for a usable plan."""
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not self.shards:
            raise ValueError("the plan has no shards")
        indices = [s.shard for s in self.shards]
        dupes = {i for i in indices if indices.count(i) > 1}
        if dupes:
            raise ValueError(f"duplicate shard indices: {_abbreviate(dupes)}")
        negative = [i for i in indices if i < 0]
        if negative:
            raise ValueError(f"negative shard indices: {_abbreviate(negative)}")
        empty = [s.shard for s in self.shards if not s.experts]
        if empty:
            raise ValueError(f"shards without experts: {_abbreviate(empty)}")
        held: set[int] = set()
        for s in self.shards:
            bad = [e for e in s.experts if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(
                    f"shard {s.shard} names experts out of range 0..{self.num_experts - 1}: {_abbreviate(bad)}"
                )
            held.update(s.experts)
        missing = set(range(self.num_experts)) - held
        if missing:
            raise ValueError(f"{len(missing)} experts are held by no shard: {_abbreviate(missing)}")

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def shard_indices(self) -> list[int]:
        return sorted(s.shard for s in self.shards)

    def experts_of(self, shard: int) -> tuple[int, ...]:
        for s in self.shards:
            if s.shard == shard:
                return tuple(sorted(set(s.experts)))
        raise KeyError(f"no shard {shard} in the plan (shards: {_abbreviate(self.shard_indices)})")

    def shards_of(self, expert: int) -> tuple[int, ...]:
        if not 0 <= expert < self.num_experts:
            raise KeyError(f"expert {expert} is out of range 0..{self.num_experts - 1}")
        return tuple(sorted(s.shard for s in self.shards if expert in s.experts))
