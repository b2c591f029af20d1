"""The admission core as a library: one slot, a line of default requests, and a
priority request that arrives last but is served first.

    python examples/library_priority.py
"""

import asyncio

from tierq import Admission, Shed


async def request(adm: Admission, name: str, tier: str, order: list[str]) -> None:
    try:
        async with adm.acquire(tier) as slot:
            order.append(f"{name} ({slot.tier}, waited {slot.queue_ms:.0f} ms)")
            await asyncio.sleep(0.05)  # the "upstream call"
    except Shed as e:
        order.append(f"{name} shed: {e.code}, retry after {e.retry_after_ms} ms")


async def main() -> None:
    adm = Admission(max_concurrency=1, queue_depth=3, max_wait_ms={"default": 1000, "priority": 2000})
    order: list[str] = []
    tasks = [asyncio.create_task(request(adm, f"default-{i}", "default", order)) for i in range(4)]
    await asyncio.sleep(0.01)  # let the defaults fill the slot and the line
    tasks.append(asyncio.create_task(request(adm, "priority-1", "priority", order)))
    await asyncio.gather(*tasks)
    print("\n".join(order))
    print(adm.stats())


if __name__ == "__main__":
    asyncio.run(main())
