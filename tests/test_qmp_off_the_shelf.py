"""QEMU's own Python QMP client (qemu.qmp, as QEMU's scripts use it) drives a source connected
straight to a destination, with no `link` program, through a postcopy-preempt migration: the
monitors speak QMP as QEMU does, not only as this project's client expects."""

import asyncio
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import PATIENCE, as_from_a_terminal, backend_sets

qmp = pytest.importorskip("qemu.qmp", reason="qemu.qmp is not installed (pip install qemu.qmp)")

SETS = ["--set", "guest.ram=32MiB", "--set", "emulator.time-scale=0.25",
        "--set", "workload.pattern=random"] + [a for s in backend_sets() for a in ("--set", s)]
PREEMPT = {"capabilities": [{"capability": "postcopy-ram", "state": True},
                            {"capability": "postcopy-preempt", "state": True},
                            {"capability": "events", "state": True}]}


async def status_of(client, want: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while (await client.execute("query-migrate")).get("status") != want:
        assert time.monotonic() < deadline, f"never {want}"
        await asyncio.sleep(0.05)


async def migrate(folder: str) -> tuple[dict, dict]:
    src, dst = qmp.QMPClient("src"), qmp.QMPClient("dst")
    await dst.connect(f"{folder}/dst.qmp")
    await src.connect(f"{folder}/src.qmp")
    for client in (src, dst):
        await client.execute("migrate-set-capabilities", PREEMPT)
    await dst.execute("migrate-incoming", {"uri": f"unix:{folder}/mig.sock"})
    await src.execute("migrate", {"uri": f"unix:{folder}/mig.sock"})
    await status_of(src, "active")
    await src.execute("migrate-start-postcopy")
    await status_of(dst, "completed")
    await status_of(src, "completed")
    result = await src.execute("query-migrate"), await dst.execute("x-query-integrity")
    for client in (src, dst):
        await client.execute("quit")
        await client.disconnect()
    return result


def test_qemus_own_qmp_client_drives_a_direct_postcopy_preempt_migration(tmp_path):
    folder = str(tmp_path)
    programs = [subprocess.Popen([sys.executable, "-m", "emu.cli", *args, *SETS],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True, preexec_fn=as_from_a_terminal)
                for args in (["destination", "--incoming", "defer", "--qmp",
                              f"unix:{folder}/dst.qmp"],
                             ["source", "--qmp", f"unix:{folder}/src.qmp"])]
    try:
        deadline = time.monotonic() + PATIENCE
        while not all(os.path.exists(f"{folder}/{s}.qmp") for s in ("src", "dst")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        source, integrity = asyncio.run(migrate(folder))
        assert source["ram"]["postcopy-requests"] > 0
        assert integrity["ok"], integrity
        assert [p.wait(PATIENCE) for p in programs] == [0, 0]
    finally:
        for p in programs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert os.listdir(folder) == []  # the monitors' and the migration's sockets went with them
