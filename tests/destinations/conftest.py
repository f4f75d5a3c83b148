"""Fixtures shared by the destination tests: a real aiohttp receiver that can inject faults."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from http_receiver import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()
