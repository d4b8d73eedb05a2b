"""Fixtures of the proxy's unit tests: the fake control plane and an HTTP session to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.control import FakeControl


@pytest.fixture
async def control() -> AsyncIterator[FakeControl]:
    fake = FakeControl()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s
