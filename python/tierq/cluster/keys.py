"""Per-key RPM/TPM for every host at once, in Redis.

GCRA on Redis TIME, the same rule as the core's bucket (`bucket::decide`), one
script call (`_KEYS`) per decision, settled to real usage and refunded like
`tierq.keys.KeyLimiter`. Keys are hash-tagged (`{tierq:key:<id>}`) so Redis
Cluster works. While Redis is down in "local" mode each host decides alone,
with the key's limits divided by the live hosts it last saw.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Final

from tierq.cluster.link import RedisLink, Script
from tierq.keys import KeyInfo, KeyLimiter, KeyRefusal
from tierq.shadow import KEY_RPM, KEY_TPM

__all__ = ["ClusterKeys"]

# KEYS: the key's rpm TAT, its tpm TAT (microseconds on Redis TIME).
# ARGV: op ("take" | "adjust"), rpm, tpm (0: none), requests, tokens.
# take: both or neither; returns {1, 0} or {0, wait_us, i} (wait -1: never fits;
# i the limit that refused, 1 rpm or 2 tpm).
# adjust: moves the TATs by requests / tokens (negative gives back); {1, 0}.
_KEYS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local function tat_of(key)
  return tonumber(redis.call('GET', key) or '0')
end
local function store(key, tat)
  if tat > now then
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local costs = {tonumber(ARGV[4]), tonumber(ARGV[5])}
if ARGV[1] == 'adjust' then
  for i = 1, 2 do
    if limits[i] > 0 and costs[i] ~= 0 then
      local tat = tat_of(KEYS[i])
      local shift = math.abs(costs[i]) * window / limits[i]
      if costs[i] > 0 then
        tat = math.max(tat, now) + shift
      else
        tat = math.max(tat - shift, math.min(now, tat))
      end
      store(KEYS[i], tat)
    end
  end
  return {1, 0}
end
local new = {}
for i = 1, 2 do
  if limits[i] > 0 and costs[i] > 0 then
    local need = costs[i] * window / limits[i]
    if need > window then return {0, -1, i} end
    local tat = math.max(tat_of(KEYS[i]), now) + need
    if tat - now > window then return {0, math.ceil(tat - now - window), i} end
    new[i] = tat
  end
end
for i = 1, 2 do
  if new[i] then store(KEYS[i], new[i]) end
end
return {1, 0}
"""
_KEYS_SCRIPT: Final = Script(_KEYS)


class ClusterKeys:
    """The key limits of a cluster host: `check_key`, `settle_key`, `refund_key`."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self._local_keys = KeyLimiter()
        self._pending: set[asyncio.Task[Any]] = set()

    async def settled(self) -> None:
        """Waits for the key settlements and refunds sent so far."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _local_key(self, key: KeyInfo) -> KeyInfo:
        """The key with its limits divided among the live hosts last seen."""
        n = max(1, self.link.hosts)
        return dataclasses.replace(
            key, rpm=None if key.rpm is None else max(1, key.rpm // n),
            tpm=None if key.tpm is None else max(1, key.tpm // n))

    @staticmethod
    def _token_cost(key: KeyInfo, est_tokens: int) -> int:
        est = max(0, est_tokens)
        return min(est, key.tpm) if key.tpm is not None else est

    async def _keys_call(self, key: KeyInfo, op: str, requests: int, tokens: int) -> list[Any]:
        tag = f"{{tierq:key:{key.public_id}}}"
        reply: list[Any] = await self.link.run(
            _KEYS_SCRIPT, [f"{tag}:rpm", f"{tag}:tpm"],
            op, key.rpm or 0, key.tpm or 0, requests, tokens)
        return reply

    async def check_key(self, key: KeyInfo, est_tokens: int) -> float | None:
        """None if admitted (and charged) cluster-wide; else seconds until it
        would be. Raises ClusterUnavailable when Redis is down in "closed" mode."""
        refused = await self.decide_key(key, est_tokens)
        return None if refused is None else refused.wait_s

    async def decide_key(self, key: KeyInfo, est_tokens: int) -> KeyRefusal | None:
        """`check_key` with which limit refused (`KeyLimiter.decide`)."""
        if key.rpm is None and key.tpm is None:
            return None
        link = self.link
        if link.up:
            try:
                reply = await self._keys_call(key, "take", 1, self._token_cost(key, est_tokens))
            except link.RedisError as e:
                link.went_down(e)
            else:
                if int(reply[0]):
                    return None
                wait_us = int(reply[1])
                return KeyRefusal(float("inf") if wait_us < 0 else wait_us / 1e6,
                                  KEY_TPM if int(reply[2]) == 2 else KEY_RPM)
        link.check_open()
        return self._local_keys.decide(self._local_key(key), est_tokens)

    def _adjust(self, key: KeyInfo, requests: int, tokens: int) -> None:
        async def run() -> None:
            try:
                await self._keys_call(key, "adjust", requests, tokens)
            except self.link.RedisError as e:
                self.link.went_down(e)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def settle_key(self, key: KeyInfo, est_tokens: int, real_tokens: int) -> None:
        """Corrects the token charge of `check_key` to the real usage."""
        if key.tpm is None:
            return
        if not self.link.up:
            self._local_keys.settle(self._local_key(key), est_tokens, real_tokens)
            return
        delta = max(0, real_tokens) - self._token_cost(key, est_tokens)
        if delta:
            self._adjust(key, 0, delta)

    def refund_key(self, key: KeyInfo, est_tokens: int, request: bool) -> None:
        """Gives back what `check_key` charged for a request the gateway did not
        serve: its token estimate, and its request count too if `request`."""
        tokens = self._token_cost(key, est_tokens) if key.tpm is not None else 0
        requests = 1 if request and key.rpm is not None else 0
        if not (tokens or requests):
            return
        if not self.link.up:
            self._local_keys.refund(self._local_key(key), est_tokens, request=request)
            return
        self._adjust(key, -requests, -tokens)
