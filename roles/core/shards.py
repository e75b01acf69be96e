"""Which backup host pulls which server: ``--shard K/N``, pure."""

from __future__ import annotations

import hashlib
import re


def shard_of(name: str, count: int) -> int:
    """The shard (1..count) a host belongs to: rendezvous (highest-random-weight) hashing.

    Several backup hosts split one inventory with ``--shard K/N``: every host lands in
    exactly one shard, and adding or removing hosts never moves the others. Each shard
    scores the name and the highest score wins, so going from N to N+1 backup hosts moves
    only the hosts the new shard now wins (about 1 in N+1; ``hash mod N`` moved about
    N of N+1), and dropping the last shard moves only its own hosts. A moved host needs a
    full first pull on its new backup host, so few moves matter.
    """
    def score(shard: int) -> bytes:
        return hashlib.sha256(f"{shard}\0{name}".encode()).digest()

    return max(range(1, count + 1), key=score)


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/3"`` -> ``(2, 3)``; ValueError with a one-line message otherwise."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]) <= 1000:
        raise ValueError(f"--shard {text!r}: expected K/N with 1 <= K <= N <= 1000, e.g. 2/3")
    return int(match[1]), int(match[2])


def shard_instance(k: int, n: int) -> str:
    """The systemd instance of shard K of N: ``K-N`` (``pullback-backup@K-N.service``)."""
    return f"{k}-{n}"


def parse_instance(text: str) -> tuple[int, int] | None:
    """``"2-3"`` -> ``(2, 3)``: a shard's instance; None: a host's (its name). ValueError
    for a shard out of range."""
    match = re.fullmatch(r"(\d+)-(\d+)", text)
    if not match:
        return None
    return parse_shard(f"{match[1]}/{match[2]}")
