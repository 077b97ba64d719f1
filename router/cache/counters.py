"""What the cache tier has done, as plain monotonic counters (the metrics exporter reads `snapshot()`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class CacheCounters:
    queries: int = 0              # lookups asked
    hits: int = 0                 # lookups that restored a prefix
    hit_tokens: int = 0           # prompt tokens restored by those hits
    bytes_read: int = 0           # bytes received from Redis (heads and parts)
    bytes_written: int = 0        # bytes of values Redis accepted
    values_written: int = 0       # values Redis accepted
    read_errors: int = 0          # lookups that failed on Redis (down, slow, refused): served as misses
    write_errors: int = 0         # values Redis did not take (down, slow, OOM at maxmemory)
    drops: int = 0                # values never sent: the write queue was full, or Redis was known down
    verification_failures: Counter = field(default_factory=Counter)  # MissReason -> values refused on read

    def snapshot(self) -> dict[str, int]:
        """Flat name -> value, one `verification_failures_<reason>` per reason seen."""
        flat = {name: getattr(self, name) for name in self.__slots__ if name != "verification_failures"}
        flat.update({f"verification_failures_{reason}": n for reason, n in sorted(self.verification_failures.items())})
        return flat
