import pytest
from hypothesis import given
from hypothesis import strategies as st

from emu.units import (
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("4096B", 4096),
        ("4K", 4 * KiB),
        ("4k", 4 * KiB),
        ("4KiB", 4 * KiB),
        ("4 KiB", 4 * KiB),
        ("2M", 2 * MiB),
        ("2MiB", 2 * MiB),
        ("1G", GiB),
        ("1GiB", GiB),
        ("64MiB", 64 * MiB),
        ("1T", TiB),
        ("1TiB", TiB),
        ("1.5MiB", 3 * MiB // 2),
        ("4KB", 4000),
        ("4kB", 4000),
        ("2MB", 2_000_000),
        ("1.25GB", 1_250_000_000),
        ("3TB", 3 * 10**12),
        ("1e3", 1000),
        (" 8MiB ", 8 * MiB),
        (2.0, 2),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10Gbit", 1.25e9),
        ("10Gbit/s", 1.25e9),
        ("10Gbps", 1.25e9),
        ("100Mbit", 12.5e6),
        ("100Mbit/s", 12.5e6),
        ("8Kbit", 1000.0),
        ("8bit", 1.0),
        ("1Tbit/s", 1.25e11),
        ("1.25GB/s", 1.25e9),
        ("1.25GB", 1.25e9),
        ("100MBps", 1e8),
        ("128MiB/s", 128.0 * MiB),
        ("2M", 2.0 * MiB),
        ("0", 0.0),
        (0, 0.0),
        ("1000", 1000.0),
        (1.5e6, 1.5e6),
    ],
)
def test_parse_rate(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200us", 200e-6),
        ("200µs", 200e-6),
        ("200μs", 200e-6),
        ("1.5s", 1.5),
        ("10ms", 0.01),
        ("500ns", 500e-9),
        ("0.3", 0.3),
        (2, 2.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("bad", ["abc", "", "4XB", "4KiBs", "4 K iB", "--4K", "nan", "inf", None])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match=r"expected a size like 4KiB, 2MiB, 64MiB or 1\.25GB, got"):
        parse_size(bad)


def test_parse_size_message_shows_input():
    with pytest.raises(ValueError) as err:
        parse_size("abc")
    assert str(err.value) == "expected a size like 4KiB, 2MiB, 64MiB or 1.25GB, got 'abc'"


@pytest.mark.parametrize("bad", ["1.5B", "1.5", "0.0001KB", "1.0001KiB"])
def test_parse_size_wants_whole_bytes(bad):
    with pytest.raises(ValueError, match="whole number of bytes"):
        parse_size(bad)


@pytest.mark.parametrize("bad", ["abc", "10Gbit/h", "10Gb", "1KiB/ms", "inf", "1e400"])
def test_parse_rate_rejects(bad):
    with pytest.raises(ValueError, match="expected a rate like 10Gbit/s"):
        parse_rate(bad)


@pytest.mark.parametrize("bad", ["abc", "2m", "2min", "1h", "10 sec", "1e400"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError, match="expected a duration like 200us"):
        parse_duration(bad)


@pytest.mark.parametrize("parse", [parse_size, parse_rate, parse_duration])
def test_booleans_are_not_numbers(parse):
    with pytest.raises(ValueError, match="got True"):
        parse(True)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (4096, "4KiB"),
        (64 * MiB, "64MiB"),
        (1536 * KiB, "1.5MiB"),
        (GiB, "1GiB"),
        (1_250_000_000, "1.25GB"),
        (1000, "1KB"),
        (4097, "4097B"),
        (-4096, "-4KiB"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("bps", "text"),
    [
        (0.0, "0"),
        (1.25e9, "10Gbit/s"),
        (125e6, "1Gbit/s"),
        (12.5e6, "100Mbit/s"),
        (5e9, "40Gbit/s"),
        (128.0 * MiB, "128MiB/s"),
        (100.0, "100B/s"),
        (0.1, "0.1B/s"),
    ],
)
def test_format_rate(bps, text):
    assert format_rate(bps) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0"),
        (200e-6, "200us"),
        (2e-6, "2us"),
        (1.5, "1.5s"),
        (0.3, "300ms"),
        (500e-9, "500ns"),
        (1 / 3, "0.3333333333333333s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@given(st.integers(min_value=-(2**62), max_value=2**62))
def test_size_round_trip(n):
    assert parse_size(format_size(n)) == n


@given(st.floats(min_value=0, max_value=1e300, allow_nan=False))
def test_rate_round_trip(bps):
    assert parse_rate(format_rate(bps)) == bps


@given(st.floats(min_value=-1e300, max_value=1e300, allow_nan=False))
def test_duration_round_trip(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from([("K", KiB), ("KiB", KiB), ("M", MiB), ("GiB", GiB), ("MB", 10**6)]),
)
def test_size_units_multiply(n, unit):
    suffix, factor = unit
    assert parse_size(f"{n}{suffix}") == n * factor
