from emu.migration.page_requests import SHOWN, PageRequestQueue, read_published


def test_fifo_and_published_view():
    buf = bytearray(PageRequestQueue.nbytes())
    q = PageRequestQueue(memoryview(buf))
    for page in (7, 3, 9):
        q.put(page, page / 10)
    assert read_published(memoryview(buf)) == [(7, 0.7), (3, 0.3), (9, 0.9)]
    assert q.pop() == (7, 0.7)
    assert q.nonempty.is_set()
    assert read_published(memoryview(buf)) == [(3, 0.3), (9, 0.9)]
    assert q.clear() == [(3, 0.3), (9, 0.9)]
    assert not q.nonempty.is_set() and q.pop() is None
    assert read_published(memoryview(buf)) == []


def test_only_the_head_is_published_when_the_queue_is_long():
    buf = bytearray(PageRequestQueue.nbytes())
    q = PageRequestQueue(memoryview(buf))
    for page in range(1000):
        q.put(page, 0.0)
    shown = read_published(memoryview(buf))
    assert [p for p, _ in shown] == list(range(SHOWN))  # the first SHOWN, in order
    assert len(q) == 1000
    q.pop()
    assert [p for p, _ in read_published(memoryview(buf))] == list(range(1, SHOWN + 1))


def test_an_unpublished_queue_still_queues():
    q = PageRequestQueue()
    q.put(5, 0.5)
    assert len(q) == 1 and q.pop() == (5, 0.5) and q.pop() is None
