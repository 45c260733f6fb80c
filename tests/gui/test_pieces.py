"""The window's plain-Python parts, without processes: page keys, grid, figures, scales."""

import numpy as np
import pytest

from emu.figures import metrics
from emu.migration import ram as R
from gui import pagemap
from gui._qt.pointraster import stamp
from gui.labels import bucket_interval, bucket_label, slider_to_scale
from gui.session import FaultLog


def test_page_keys_show_what_display_states_shows():
    rng = np.random.default_rng(1)
    dst = rng.integers(0, len(R.DEST_STATE_NAMES), 5000).astype(np.uint8)
    src = rng.integers(0, 4, 5000).astype(np.uint8)
    keys = pagemap.page_keys(dst, src, np.empty(5000, np.uint8))
    assert np.array_equal(pagemap.KEY_CODES[keys], R.display_states(dst, src))


# What a page looks like, by what each side did with it. The source resets a discarded page
# to unsent at switchover, so a discarded page it sends again is in flight like any other.
SHOWN_AS = [
    (R.MISSING, R.UNSENT, R.MISSING),
    (R.MISSING, R.SENT_MAIN, R.INFLIGHT_MAIN),
    (R.DISCARDED, R.UNSENT, R.DISCARDED),
    (R.DISCARDED, R.SENT_MAIN, R.INFLIGHT_MAIN),  # re-sent in the background stream
    (R.DISCARDED, R.SENT_URGENT_MAIN, R.INFLIGHT_MAIN),  # re-sent on request, vanilla
    (R.DISCARDED, R.SENT_PREEMPT, R.INFLIGHT_PREEMPT),  # re-sent on request, preempt
    (R.REQUESTED, R.UNSENT, R.REQUESTED),
    (R.REQUESTED, R.SENT_URGENT_MAIN, R.INFLIGHT_MAIN),
    (R.REQUESTED, R.SENT_PREEMPT, R.INFLIGHT_PREEMPT),
    (R.PRECOPY, R.SENT_MAIN, R.PRECOPY),
    (R.BACKGROUND, R.SENT_MAIN, R.BACKGROUND),
    (R.URGENT_MAIN, R.SENT_URGENT_MAIN, R.URGENT_MAIN),
    (R.URGENT_PREEMPT, R.SENT_PREEMPT, R.URGENT_PREEMPT),
]


@pytest.mark.parametrize("dst, src, code", SHOWN_AS)
def test_what_each_page_shows_as(dst, src, code):
    key = pagemap.page_keys(np.array([dst], np.uint8), np.array([src], np.uint8),
                            np.empty(1, np.uint8))[0]
    assert R.DISPLAY_NAMES[pagemap.KEY_CODES[key]] == R.DISPLAY_NAMES[code]
    assert tuple(pagemap.lookup_table()[key]) == pagemap.COLOURS[code]  # the colour drawn


def test_a_queued_request_shows_as_requested_whatever_the_source_says():
    dst = np.array([R.REQUESTED, R.REQUESTED, R.PRECOPY], np.uint8)
    src = np.array([R.SENT_MAIN, R.SENT_MAIN, R.SENT_MAIN], np.uint8)
    keys = pagemap.page_keys(dst, src, np.empty(3, np.uint8), queued=np.array([0, 2]))
    assert pagemap.KEY_CODES[keys].tolist() == [R.REQUESTED, R.INFLIGHT_MAIN, R.PRECOPY]


def test_counts_per_display_state():
    dst = np.array([R.MISSING, R.BACKGROUND, R.BACKGROUND, R.URGENT_PREEMPT], np.uint8)
    keys = pagemap.page_keys(dst, np.zeros(4, np.uint8), np.empty(4, np.uint8))
    counts = pagemap.counts(keys)
    assert (counts[R.MISSING], counts[R.BACKGROUND], counts[R.URGENT_PREEMPT]) == (1, 2, 1)


def test_pooling_keeps_the_most_telling_page_of_each_block():
    dst = np.full((4, 4), R.BACKGROUND, np.uint8)
    dst[0, 1] = R.URGENT_PREEMPT
    dst[3, 3] = R.REQUESTED
    dst[2, 0] = R.MISSING
    keys = pagemap.page_keys(dst, np.zeros((4, 4), np.uint8), np.empty((4, 4), np.uint8))
    pooled = pagemap.KEY_CODES[pagemap.pool(keys, 2)]
    assert pooled.tolist() == [[R.URGENT_PREEMPT, R.BACKGROUND], [R.BACKGROUND, R.REQUESTED]]
    assert pagemap.KEY_CODES[pagemap.pool(keys, 4)].tolist() == [[R.REQUESTED]]


def test_pooling_an_odd_grid_and_its_factor():
    keys = np.full((3, 4), pagemap.OUTSIDE_KEY, np.uint8)
    keys[2, 3] = pagemap.REQUESTED_KEY
    assert pagemap.KEY_CODES[pagemap.pool(keys, 2)].tolist() == \
        [[pagemap.OUTSIDE, pagemap.OUTSIDE], [pagemap.OUTSIDE, R.REQUESTED]]
    assert pagemap.pool_factor(1024, 1024, 480, 480) == 2  # a 4 GiB guest in 480 pixels
    assert pagemap.pool_factor(128, 128, 480, 480) == 1
    assert pagemap.pool_factor(2048, 2048, 300, 300) == 4


def test_every_display_state_has_a_colour_and_a_legend_line():
    lut = pagemap.lookup_table()
    assert lut.shape == (256, 3)
    assert set(pagemap.LEGEND) == set(range(len(R.DISPLAY_NAMES))) == set(pagemap.LEGEND_ORDER)
    colours = {pagemap.COLOURS[code] for code in pagemap.LEGEND}
    assert len(colours) == len(pagemap.LEGEND)  # no two states look the same


@pytest.mark.parametrize("npages, shape", [(1, (1, 1)), (4096, (64, 64)), (16384, (128, 128)),
                                           (32768, (128, 256)), (1 << 20, (1024, 1024)),
                                           (3, (2, 2))])
def test_grid_is_square_ish_with_round_rows(npages, shape):
    rows, cols = pagemap.grid_shape(npages)
    assert (rows, cols) == shape
    assert rows * cols >= npages


def test_fault_log_figures_match_metrics_summarize():
    rng = np.random.default_rng(2)
    log = FaultLog()
    batches = []
    for size in (0, 7, 300, 1, 2000, 50):
        batch = np.zeros(size, metrics.FAULT_DTYPE)
        batch["latency"] = rng.lognormal(-7, 1.5, size)
        batch["channel"] = rng.integers(0, 2, size)
        log.extend(batch)
        batches.append(batch)
    every = np.concatenate(batches)
    expected = metrics.summarize(every["latency"])
    assert log.summary() == {k: v for k, v in expected.items() if k != "dist"}
    assert log.dist.sum(axis=0)[:len(expected["dist"])].tolist() == expected["dist"]
    assert len(log.records) == len(every)


def test_bucket_labels_are_qemus_log2_edges_exactly():
    # 2^13 us is 8.192 ms: not "8ms", which a newcomer reads as a round 8000 us
    assert [bucket_label(n) for n in (0, 1, 9, 10, 13, 14, 20)] == \
        ["1us", "2us", "512us", "1.02ms", "8.19ms", "16.4ms", "1.05s"]
    assert bucket_interval(13) == "[8.19 ms, 16.4 ms) = [2^13, 2^14) us"


def test_time_scale_slider_spans_a_hundredth_to_ten():
    assert slider_to_scale(0) == 0.01
    assert slider_to_scale(100) == 0.1
    assert slider_to_scale(300) == 10


def test_points_become_dots_clipped_at_the_edges():
    image = np.zeros((5, 5, 4), np.uint8)
    stamp(image, (0, 5, 0, 5), np.array([2.5]), np.array([2.5]), (9, 8, 7, 255))
    assert (image[..., 0] > 0).tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                                            [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert image[2, 2].tolist() == [9, 8, 7, 255]
    image[:] = 0  # a point just outside still shows the part of its dot that is inside
    stamp(image, (0, 5, 0, 5), np.array([-1.5, 4.9, 99.0]), np.array([0.5, 6.5, 99.0]),
          (9, 9, 9, 255))
    assert np.argwhere(image[..., 0]).tolist() == [[0, 0], [1, 0], [4, 3], [4, 4]]
