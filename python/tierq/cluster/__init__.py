"""Several gateway hosts, one tier: slots and per-key limits shared through Redis.

`[cluster]` turns it on (docs/operations.md, "Running N hosts", is the long
form). Three things live in Redis, each behind one Lua script so a decision is
one round trip and atomic:

- **Slot leases** (`_LEASE`). Each pool's limit (`max_concurrency`) is split
  into leases: a hash of host -> slots leased, a hash of host -> lease
  deadline, a hash of host -> priority waiters. A host's local admission keeps
  to its lease by withholding the rest of the pool's slots in its own core
  (`Admission.withhold`/`restore`), so the request path stays local: Redis is
  asked only when the host needs more slots than it holds, gives some back, or
  refreshes its deadline (every `lease_ttl_ms / 3`). The script drops the
  hosts whose deadline passed before deciding, so a dead host's slots come
  back within its TTL, and it grants slots for default demand only while no
  host has priority waiters (strict priority across hosts), keeping
  `priority_headroom` slots of the limit for priority demand, and slots for
  flex demand only while no host has priority waiters or unmet demand (flex
  demand is never unmet demand: it makes no host give a slot back).
- **Fair counters** (`_FAIR`, pools with `fairness = "tokens"`): each flow
  queue's service, summed over the hosts, beside each host's part, in the lease
  agent's round (docs/operations.md, "Fair across hosts").
- **Per-key RPM/TPM** (`_KEYS`): GCRA on Redis TIME, the same rule as the
  core's bucket (`bucket::decide`), one script call per decision, settled to
  real usage and refunded like `tierq.keys.KeyLimiter`. Keys are hash-tagged
  (`{tierq:key:<id>}`, `{tierq:pool:<model>}`) so Redis Cluster works.
- **Downgrades** (`_DOWNGRADES`): a key's ramp counts per step and its
  priority spend of the UTC day, the same rule as `tierq.downgrades`, one
  script call per decision (both takes or neither), settled and refunded the
  same way, a restart's ledger spend raised into it once per ledger.

Redis down: `on_redis_down = "local"` keeps serving with the host's share of
each limit (the limit divided by the live hosts it last saw) and rejoins by
itself; `"closed"` answers new requests 503 (`ClusterUnavailable`).

The package, by job: `link` (the Redis client, its scripts, up and down, the
down modes and `ClusterUnavailable`), `leases` (the lease agent and each pool's
`PoolLease`), `flows` (a fair pool's counters, carried in the lease agent's
round: `_FAIR`), `keys` (the key limits in Redis), `downgrades` (the keys'
ramp rules and budgets in Redis), `host` (`Cluster`, which holds them).
"""

from tierq.cluster.host import Cluster, default_host_id
from tierq.cluster.leases import PoolLease, cluster_settings
from tierq.cluster.link import CLOSED_RETRY_AFTER_S, ClusterUnavailable, require_redis

__all__ = ["CLOSED_RETRY_AFTER_S", "Cluster", "ClusterUnavailable", "PoolLease", "cluster_settings", "default_host_id",
           "require_redis"]
