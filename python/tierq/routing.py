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
  host and moves only when its own endpoint leaves.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any, Final

__all__ = [
    "BLOCK_CHARS",
    "ROUTE_BLOCKS",
    "RULES",
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
# The core's pick rule for each `routing` (core/replicas.rs `Rule`).
RULES: Final = {"round_robin": 0, "prefix": 1, "least_loaded": 2}


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
    """One upstream's routing: the order of a request and the core's rule."""

    __slots__ = ("endpoints", "routing", "rule", "_turn")

    def __init__(self, endpoints: Sequence[str], routing: str) -> None:
        self.endpoints = tuple(endpoints)
        self.routing = routing
        self.rule = RULES[routing]
        self._turn = itertools.count()

    def home(self, order: int) -> int:
        """The request's home for the core's grant rule (core/replicas.rs
        `HOME_LOOK_AHEAD`): the first of its order plus one under `prefix`,
        else 0 (round robin and least loaded want no replica kept for it)."""
        return (order & 0xF) + 1 if self.routing == "prefix" and len(self.endpoints) > 1 else 0

    def order(self, endpoint: str, body: dict[str, Any]) -> int:
        """The request's replica order as one int (0 with one endpoint)."""
        n = len(self.endpoints)
        if n == 1:
            return 0
        if self.routing == "prefix":
            return order_word(rendezvous(route_key(prompt_text(endpoint, body)), self.endpoints))
        # Round robin: the next in turn first; least loaded: the turn breaks ties.
        start = next(self._turn) % n
        return order_word([(start + i) % n for i in range(n)])
