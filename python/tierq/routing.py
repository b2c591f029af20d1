"""Which replica a request should go to first: its replica order.

Python owns routing, the core owns admission (core/replicas.rs): this module
turns a request body into an order of an upstream's endpoints, best first,
packed as the core reads it (4-bit replica numbers in one int). The rule
(docs/gateway.md, "Routing among replicas"):

- the prompt is rendered as text, as the sim's prefix cache renders it
  (docs/sim.md): a chat request's messages in order, each as its role, a
  newline, its text (a string content, or its text parts joined) and a
  blank line; a completion's prompt (a list of prompts: its strings joined
  by newlines); an embedding's input the same way;
- the rendering is cut into blocks of `BLOCK_CHARS` characters; the route key
  is the hash of the first `ROUTE_BLOCKS` whole blocks, each block's hash
  chained on the one before (BLAKE2b, 8 bytes: no per-process salt, so every
  worker and host agrees), or of the whole rendering when it is shorter than
  one block;
- the endpoints are ranked by rendezvous (highest random weight) hashing of
  the key with each endpoint's URL, so a prefix's home is the same on every
  host and moves only when its own endpoint leaves;
- a prefix is hot while its own share of the upstream's recent arrivals (as
  this worker counts them, halved every `HOT_HALF_LIFE_S`) passes half a
  replica's load bound, `HOT_BOUND_SHARE`: a hot prefix has two homes (the
  first two of its order) and takes the less loaded of them with room (rule
  TwoHomes); a cold one has its one home and goes there while it has room
  (rule First), then the next in its order with room: no load bound spills
  a cold prefix into other replicas' caches.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

__all__ = [
    "BLOCK_CHARS",
    "BOUNDED",
    "FIRST",
    "HOT_BOUND_SHARE",
    "HOT_HALF_LIFE_S",
    "HOT_MIN_ARRIVALS",
    "HOT_TABLE_MAX",
    "LEAST_LOADED",
    "ROUTE_BLOCKS",
    "RULES",
    "TWO_HOMES",
    "Route",
    "Router",
    "order_word",
    "prompt_text",
    "rendezvous",
    "route_key",
]

BLOCK_CHARS: Final = 256
# 1,024 characters: deep enough that two system prompts sharing a boilerplate
# opening get their own homes, shallow enough that a short user turn after a
# long system prompt does not move it.
ROUTE_BLOCKS: Final = 4
# The core's pick rules (core/replicas.rs `Rule`).
FIRST: Final = 0
BOUNDED: Final = 1
LEAST_LOADED: Final = 2
TWO_HOMES: Final = 3
# The core's pick rule for each `routing` (under "prefix" a hot prefix's;
# a cold one's is FIRST). BOUNDED, the load bound, is no routing's now.
RULES: Final = {"round_robin": FIRST, "prefix": TWO_HOMES, "least_loaded": LEAST_LOADED}
# A prefix is hot once its share of the arrivals passes half a replica's load
# bound (core/replicas.rs BOUND_NUM / BOUND_DEN = 1.25 x a replica's share):
# alone it then fills half of what its home may hold, and its home's other
# prefixes would push the home over the bound. With 4 replicas: 1.25 / 8 =
# 15.6% of the arrivals.
HOT_BOUND_SHARE: Final = 1.25 / 2
# Arrivals are counted with this half-life (so a prefix that cools down
# goes back to one home within a few of them) ...
HOT_HALF_LIFE_S: Final = 10.0
# ... and a prefix is hot only once it has this many (halved as the rest):
# one request is all of a fresh worker's arrivals.
HOT_MIN_ARRIVALS: Final = 8.0
# At most this many prefixes counted: more (unshared prompts) halve early.
HOT_TABLE_MAX: Final = 4096


class Route(NamedTuple):
    """A request's route: its replica order as the core reads it, the core's
    pick rule for it, and its homes for the grant rule (bit r: replica r;
    0: none, core/replicas.rs HOME_LOOK_AHEAD)."""
    order: int
    rule: int
    homes: int


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: their text, joined with nothing between
        parts = (p.get("text") if isinstance(p, dict) else p for p in value)
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    """The rendered prompt (module doc)."""
    if endpoint == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return ""
        return "".join(f"{m.get('role', '')}\n{_text(m.get('content'))}\n\n"
                       for m in messages if isinstance(m, dict))
    value = body.get("prompt" if endpoint == "completions" else "input")
    if isinstance(value, list):
        return "\n".join(v for v in value if isinstance(v, str))
    return value if isinstance(value, str) else ""


def route_key(text: str) -> bytes:
    """The hash chain of the leading whole blocks (module doc)."""
    whole = min(len(text) // BLOCK_CHARS, ROUTE_BLOCKS)
    if whole == 0:
        return hashlib.blake2b(text.encode(), digest_size=8).digest()
    key = b""
    for i in range(whole):
        block = text[i * BLOCK_CHARS:(i + 1) * BLOCK_CHARS]
        key = hashlib.blake2b(key + block.encode(), digest_size=8).digest()
    return key


def rendezvous(key: bytes, endpoints: Sequence[str]) -> list[int]:
    """Endpoint indexes by descending weight of (key, endpoint URL)."""
    weights = [hashlib.blake2b(key + url.encode(), digest_size=8).digest() for url in endpoints]
    return sorted(range(len(endpoints)), key=lambda i: weights[i], reverse=True)


def order_word(order: Sequence[int]) -> int:
    """An order packed as the core reads it: 4 bits a replica, best first."""
    word = 0
    for i, r in enumerate(order[:16]):
        word |= (r & 0xF) << (4 * i)
    return word


class Router:
    """One upstream's routing: a request's route (module doc)."""

    __slots__ = ("endpoints", "routing", "rule", "_turn", "_clock", "_counts", "_total", "_halved_at")

    def __init__(self, endpoints: Sequence[str], routing: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = tuple(endpoints)
        self.routing = routing
        self.rule = RULES[routing]
        self._turn = itertools.count()
        self._clock = clock
        # Prefix routing's arrival counts: route key -> arrivals (halved).
        self._counts: dict[bytes, float] = {}
        self._total = 0.0
        self._halved_at = clock()

    def hot(self, key: bytes, count: bool = True) -> bool:
        """Counts one arrival of `key` (unless `count` is false: a request
        sent again); true if its prefix is hot (module doc)."""
        if not count:
            return self._hot(self._counts.get(key, 0.0))
        now = self._clock()
        if now - self._halved_at >= HOT_HALF_LIFE_S or len(self._counts) >= HOT_TABLE_MAX:
            halvings = max(1, int((now - self._halved_at) // HOT_HALF_LIFE_S))
            f = 0.5 ** min(halvings, 64)
            self._counts = {k: c * f for k, c in self._counts.items() if c * f >= 0.5}
            self._total *= f
            self._halved_at = now
        seen = self._counts.get(key, 0.0) + 1.0
        self._counts[key] = seen
        self._total += 1.0
        return self._hot(seen)

    def _hot(self, seen: float) -> bool:
        return seen >= HOT_MIN_ARRIVALS and seen >= HOT_BOUND_SHARE / len(self.endpoints) * self._total

    def route(self, endpoint: str, body: dict[str, Any], count: bool = True) -> Route:
        """The request's route (0, FIRST, 0 with one endpoint); `count`:
        false for a request sent again (its arrival was counted)."""
        n = len(self.endpoints)
        if n == 1:
            return Route(0, FIRST, 0)
        if self.routing == "prefix":
            key = route_key(prompt_text(endpoint, body))
            order = rendezvous(key, self.endpoints)
            if self.hot(key, count):
                return Route(order_word(order), TWO_HOMES, (1 << order[0]) | (1 << order[1]))
            return Route(order_word(order), FIRST, 1 << order[0])
        # Round robin: the next in turn first; least loaded: the turn breaks
        # ties. Neither keeps a replica for a request (no homes).
        start = next(self._turn) % n
        return Route(order_word([(start + i) % n for i in range(n)]), self.rule, 0)
