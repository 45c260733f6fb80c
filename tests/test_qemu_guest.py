"""The bench's own guest (emu/qemu/guest.S): its build, its walks, the check of its memory,
and, where QEMU is installed, the guest running alone."""

import os
import struct
import tempfile
import time

import pytest

from emu.qemu import available, guest, harness

needs_tools = pytest.mark.skipif(guest.missing_tools() is not None,
                                 reason=str(guest.missing_tools()))
needs_qemu = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache, so the build really runs and nothing lands in the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "postcopy-emu"


@pytest.mark.parametrize("pattern", guest.PATTERNS)
def test_every_walk_visits_each_page_once_per_pass(pattern):
    walk = guest.Walk.for_ram(pattern, 32 << 20)
    order = walk.order()
    assert sorted(order) == list(range(walk.npages))
    if pattern != "ascending":
        jumps = [abs(b - a) for a, b in zip(order, order[1:], strict=False)]
        assert sorted(jumps)[len(jumps) // 2] > walk.npages // 10  # far, mostly


def test_the_region_stays_inside_ram_and_whole_huge_pages():
    walk = guest.Walk.for_ram("stride", 256 << 20)
    assert walk.base == 2 << 20 and walk.base + walk.npages * guest.PAGE == 254 << 20
    with pytest.raises(ValueError, match="pattern must be one of"):
        guest.Walk.for_ram("backwards", 256 << 20)


@needs_tools
def test_the_guest_builds_once_into_the_cache_with_its_parameters(cache, tmp_path):
    image = guest.built_image()
    assert image.parent == cache and image.read_bytes()[:4] == b"\x7fELF"
    assert [p.name for p in cache.iterdir()] == [image.name]  # no build leftovers
    assert guest.built_image() == image and image.stat().st_mtime_ns == \
        guest.built_image().stat().st_mtime_ns
    walk = guest.Walk.for_ram("random", 64 << 20, seed=7)
    copy = tmp_path / "guest.elf"
    guest.write_image(walk, str(copy))
    data = copy.read_bytes()
    at = data.index(guest.PARAMS_MAGIC)
    assert data[at:at + len(walk.params())] == walk.params()
    assert struct.unpack_from("<7I", data, at + 8)[1:5] == (2, walk.base, walk.npages,
                                                             walk.stride)


def _region(walk, passes, index):
    """The memory the guest leaves after `passes - 1` whole passes and `index` steps."""
    region = bytearray(walk.npages * guest.PAGE)
    order = walk.order()
    for number in range(1, passes + 1):
        for page in order[:index] if number == passes else order:
            struct.pack_into("<2I", region, page * guest.PAGE,
                             (walk.base + page * guest.PAGE) ^ guest.MARK, number)
    return region


def test_verify_accepts_what_the_guest_writes_and_names_the_first_wrong_page():
    walk = guest.Walk.for_ram("stride", 8 << 20)
    status = guest.Status(1, 3, 100, 0, 2 * walk.npages + 100)
    region = _region(walk, 3, 100)
    guest.verify(walk, status, region)
    guest.verify(walk, status, _region(walk, 3, 101))  # stopped between write and count
    page = walk.order()[500]
    struct.pack_into("<I", region, page * guest.PAGE + 4, 3)  # a pass too far
    with pytest.raises(guest.GuestError, match=f"page {walk.base + page * guest.PAGE:#x}"):
        guest.verify(walk, status, region)
    region = _region(walk, 3, 100)
    at = walk.order()[7] * guest.PAGE
    region[at:at + 8] = bytes(8)  # lost: a zero page
    with pytest.raises(guest.GuestError, match="position 7 of pass 3"):
        guest.verify(walk, status, region)


def test_verify_during_the_first_pass_expects_untouched_pages_zero():
    walk = guest.Walk.for_ram("random", 8 << 20)
    guest.verify(walk, guest.Status(1, 1, 10, 0, 10), _region(walk, 1, 10))


@needs_qemu
@pytest.mark.timeout(60)
def test_the_guest_alone_on_qemu_counts_passes_and_leaves_what_it_wrote(cache):
    scenario = harness.Scenario(pattern="random", ram=32 << 20)
    walk = guest.Walk.for_ram(scenario.pattern, scenario.ram)
    workdir = tempfile.mkdtemp(prefix="pce-qemu-test-")
    try:
        image = os.path.join(workdir, "guest.elf")
        guest.write_image(walk, image)
        with harness.Qemu("guest", scenario, image, workdir, [], ()) as qemu:
            qemu.wait_guest(1)
            first = qemu.status()
            time.sleep(0.2)
            second = qemu.status()
            assert second.passes > first.passes and second.touches > first.touches
            qemu.qmp.cmd("stop")
            qemu.verify(walk, qemu.status())
            qemu.quit()
    finally:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
