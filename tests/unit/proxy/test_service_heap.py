"""The proxy freezes its start-up heap once started (`service.settle_heap`)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from egressd.proxy import service


@pytest.fixture
def unfrozen() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_settle_heap_collects_then_freezes(unfrozen: None) -> None:
    class Cycle:
        me: object

    garbage = Cycle()
    garbage.me = garbage
    gone = weakref.ref(garbage)
    del garbage  # only the cyclic collector frees it
    kept = Cycle()
    service.settle_heap()
    assert gone() is None  # collected, not frozen
    assert gc.get_freeze_count() > 0
    assert not gc.is_finalized(kept) and not any(o is kept for o in gc.get_objects())


def test_settle_heap_raises_only_the_young_threshold(unfrozen: None) -> None:
    gc.set_threshold(700, 9, 8)
    service.settle_heap()
    assert gc.get_threshold() == (service.YOUNG_GC_THRESHOLD, 9, 8)
    assert service.YOUNG_GC_THRESHOLD > 700


def test_serve_passes_settle_heap_as_started(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    async def fake_serve(daemon: object, stop: object, **kw: object) -> None:
        seen.update(kw)

    monkeypatch.setattr(service, "serve_until_stopped", fake_serve)
    monkeypatch.setattr(service, "ProxyService", lambda config: object())
    import asyncio

    asyncio.run(service.serve(object()))  # type: ignore[arg-type]
    assert seen["started"] is service.settle_heap
