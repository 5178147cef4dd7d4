"""podpatterns.ambassador.deadlines: one timer for many fixed timeouts."""

from __future__ import annotations

import asyncio

from podpatterns.ambassador.deadlines import Deadlines


def test_items_expire_in_order_and_discarded_ones_never() -> None:
    """Three items, 50 ms each, the middle one done early: the first and last expire, in
    the order they were added, each at or after its own deadline; one timer at a time."""

    async def scenario() -> list[tuple[str, bool]]:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        expired: list[tuple[str, bool]] = []
        deadlines: dict[str, float] = {}

        def expire(item: str) -> None:
            expired.append((item, loop.time() >= deadlines[item]))
            if len(expired) == 2:
                done.set()

        held: Deadlines[str] = Deadlines(0.05, expire)
        deadlines["a"] = held.add("a")
        await asyncio.sleep(0)  # a loop iteration between the adds: a later clock
        deadlines["b"] = held.add("b")
        deadlines["c"] = held.add("c")
        held.discard("b")
        assert held.items() == ["a", "c"] and "b" not in held
        async with asyncio.timeout(30):
            await done.wait()
        assert len(held) == 0
        held.close()
        return expired

    assert asyncio.run(scenario()) == [("a", True), ("c", True)]


def test_an_item_added_again_takes_the_later_deadline_and_close_expires_none() -> None:
    """Added twice, an item expires once, after its second deadline; close() forgets the
    rest without calling expire (shown by another item with the same timeout, added
    after, expiring while the forgotten one did not)."""

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        expired: list[str] = []
        fired: asyncio.Queue[str] = asyncio.Queue()

        def expire(item: str) -> None:
            expired.append(item)
            fired.put_nowait(item)

        held: Deadlines[str] = Deadlines(0.02, expire)
        other: Deadlines[str] = Deadlines(0.02, expire)
        held.add("x")
        later = held.add("x")
        async with asyncio.timeout(30):
            assert await fired.get() == "x"
        assert loop.time() >= later
        held.add("y")
        held.close()
        other.add("z")
        async with asyncio.timeout(30):
            assert await fired.get() == "z"
        return expired

    assert asyncio.run(scenario()) == ["x", "z"]
