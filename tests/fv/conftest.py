"""One lab per test module (3 nodes over both subnets); removed even when a test fails."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tabby.lab.cluster import Lab


@pytest.fixture(scope="module")
def lab(root_caps: None) -> Iterator[Lab]:
    name = "t" + uuid.uuid4().hex[:7]
    try:
        cluster = Lab.up(name, 3, progress=lambda _m: None)
        yield cluster
    finally:
        Lab.down(name, progress=lambda _m: None)
