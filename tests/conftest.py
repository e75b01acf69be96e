"""The whole suite's seam: destinations below pytest's temporary folder are allowed.

Tests write backups into ``tmp_path``; the rule of roles.core.destinations allows only a few
roots (and an inventory's explicit ``backup.allow_destination``). Its test seam
``EXTRA_ROOTS`` takes pytest's base temporary folder here, in this process only: no
inventory reaches it. Tests that run ``invoke`` in a subprocess set
``backup.allow_destination`` in their inventory instead (as the lab does).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from roles.core import destinations


@pytest.fixture(autouse=True, scope="session")
def _destinations_in_pytests_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = str(tmp_path_factory.getbasetemp())
    destinations.EXTRA_ROOTS.append(root)
    yield
    destinations.EXTRA_ROOTS.remove(root)
