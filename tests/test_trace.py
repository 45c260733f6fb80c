"""emu.trace: QEMU's -trace patterns, points cheap when off, what they send."""

import pytest

from emu import trace
from tests.conftest import recorded


@pytest.fixture(autouse=True)
def clean_slate():
    yield from recorded()


def test_patterns_as_qemu_writes_them(clean_slate):
    triggered = trace.point("postcopy_preempt_triggered")
    restored = trace.point("postcopy_preempt_restored")
    queued = trace.point("ram_save_queue_pages")
    assert not triggered.enabled  # off until asked for
    on = trace.enable(["postcopy_preempt_*"])  # and those the imported modules declare
    assert {"postcopy_preempt_restored", "postcopy_preempt_triggered"} <= set(on)
    assert on == sorted(n for n in trace.known() if n.startswith("postcopy_preempt_"))
    assert triggered.enabled and restored.enabled and not queued.enabled
    trace.enable(["*", "-postcopy_preempt_restored"])  # a '-' pattern switches a match off
    assert triggered.enabled and queued.enabled and not restored.enabled
    triggered(page=7)
    assert clean_slate == [("postcopy_preempt_triggered", {"page": 7})]


def test_a_point_made_after_enable_follows_the_patterns():
    trace.enable(["postcopy_place_page*"])
    assert trace.point("postcopy_place_page_zero").enabled
    assert not trace.point("postcopy_ram_fault_thread_request").enabled
    assert trace.point("postcopy_place_page_zero") is trace.point("postcopy_place_page_zero")
