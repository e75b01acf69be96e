"""Run one function per host on a thread pool; one failing host never stops the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

H = TypeVar("H")  # a host of the inventory (the fleet needs nothing of it)
T = TypeVar("T")


def for_each(hosts: list[H], work: Callable[[H], T], on_error: Callable[[H, Exception], T],
             parallel: int = 8) -> list[T]:
    """``work(host)`` for every host, concurrently; results in inventory order."""

    def guarded(host: H) -> T:
        try:
            return work(host)
        except Exception as exc:  # noqa: BLE001 - reported per host, the others go on
            return on_error(host, exc)

    if len(hosts) <= 1:
        return [guarded(h) for h in hosts]
    from concurrent.futures import ThreadPoolExecutor  # only for a fleet: one host starts lean

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        return list(pool.map(guarded, hosts))
