"""A flow charged once across hosts: each pool's fair counters travel in the
lease agent's round. The service this host's core gave each flow queue since
the last round (`Admission.fair_service_export`) is added in Redis (`_FAIR`,
in the same pipeline as the lease call), and what the other hosts gave comes
back and is added to this host's counters (`fair_service_import`): a key served
on several hosts is charged on each for all of it. The bound is in
docs/operations.md ("Fair across hosts").
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from tierq.admission import Admission
from tierq.cluster.link import Script

__all__ = ["FAIR_SCRIPT", "FlowCounters"]

# KEYS: the pool's service totals (field "lane:queue" -> what every host gave
#       that flow queue; field "#" the totals' epoch), this host's part (the
#       same fields).
# ARGV: ttl_ms, an epoch for totals made now, then lane, queue, service
#       triples: this host's service since its last call.
# Returns the epoch, then field, service the other hosts gave (the total minus
# this host's part) pairs, for every field.
_FAIR: Final = """
redis.call('HSETNX', KEYS[1], '#', ARGV[2])
for i = 3, #ARGV, 3 do
  local f = ARGV[i] .. ':' .. ARGV[i + 1]
  redis.call('HINCRBY', KEYS[1], f, ARGV[i + 2])
  redis.call('HINCRBY', KEYS[2], f, ARGV[i + 2])
end
local totals = redis.call('HGETALL', KEYS[1])
local out = {redis.call('HGET', KEYS[1], '#')}
for i = 1, #totals, 2 do
  if totals[i] ~= '#' then
    local mine = tonumber(redis.call('HGET', KEYS[2], totals[i]) or '0')
    out[#out + 1] = totals[i]
    out[#out + 1] = string.format('%.0f', tonumber(totals[i + 1]) - mine)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return out
"""
FAIR_SCRIPT: Final = Script(_FAIR)


@dataclass(slots=True)
class FlowCounters:
    """One pool's fair counters as this host shares them: `args()` for the
    script's call, `incoming()` with its reply."""

    admission: Admission
    #: field ("lane:queue") -> the other hosts' service already taken in;
    #: None until the first reply, which only sets the baseline (the cluster's
    #: history before this host joined is not charged to its flows).
    taken: dict[str, int] | None = None
    #: the totals' epoch last seen: another means Redis lost them (a restart,
    #: or every host gone past the TTL) and all it holds is new since.
    epoch: str = ""

    def keys(self, model: str, host_id: str) -> list[str]:
        tag = f"{{tierq:pool:{model}}}"
        return [f"{tag}:fair", f"{tag}:fair:{host_id}"]

    def args(self, ttl_ms: int) -> list[str | int]:
        """The script's ARGV, with this host's service since the last call taken
        from the core now: a call that then fails loses it (that service is not
        shared), it is never counted twice."""
        out: list[str | int] = [ttl_ms, secrets.token_hex(8)]
        for lane, queue, service in self.admission.fair_service_export():
            if service > 0:
                out += [lane, queue, service]
        return out

    def incoming(self, reply: Sequence[Any]) -> int:
        """Adds to this host's counters what the other hosts gave each queue since
        the last reply; returns the service taken in."""
        epoch = _text(reply[0])
        first, renewed = self.taken is None, epoch != self.epoch
        taken = {} if self.taken is None or renewed else self.taken
        grown: list[tuple[int, int, int]] = []
        for name_raw, others_raw in zip(reply[1::2], reply[2::2], strict=True):
            name, others = _text(name_raw), int(others_raw)
            before = taken.get(name, 0)
            if others > before and not first:
                lane, _, queue = name.partition(":")
                grown.append((int(lane), int(queue), others - before))
            taken[name] = others
        self.taken, self.epoch = taken, epoch
        if grown:
            self.admission.fair_service_import(grown)
        return sum(s for _, _, s in grown)


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
