"""bench/guest_layout.py without a guest: its newc writer, console parser, step buckets and
argument checks (the real boot takes a minute and a 70 MB download, so it is run by hand)."""

import gzip
import importlib.util
import stat
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "guest_layout.py"
_spec = importlib.util.spec_from_file_location("bench_guest_layout", BENCH)
gl = sys.modules["bench_guest_layout"] = importlib.util.module_from_spec(_spec)  # dataclasses
_spec.loader.exec_module(gl)


def read_newc(data: bytes) -> list[tuple[str, int, int, bytes]]:
    """(name, mode, nlink, data) of each entry up to the trailer, checking the padding."""
    out, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = f[6], f[11]
        name = data[pos + 110:pos + 110 + namesize]
        assert name.endswith(b"\0") and b"\0" not in name[:-1]
        pos += 110 + namesize
        assert pos % 4 == 0 or data[pos:pos + (-pos % 4)] == b"\0" * (-pos % 4)
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size + (-size % 4)
        if name[:-1] == b"TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name[:-1].decode(), f[1], f[4], body))


def test_newc_holds_the_entries_with_their_modes_padded_to_4_bytes():
    init = bytes(range(256)) * 3 + b"odd"  # a length that needs padding
    archive = gl.newc([("proc", stat.S_IFDIR | 0o755, b""), ("init", stat.S_IFREG | 0o755, init)])
    assert len(archive) % 4 == 0
    assert read_newc(archive) == [("proc", stat.S_IFDIR | 0o755, 2, b""),
                                  ("init", stat.S_IFREG | 0o755, 1, init)]


def test_the_initramfs_is_gzip_of_dirs_and_an_executable_init():
    entries = read_newc(gzip.decompress(gl.initramfs(b"\x7fELF...")))
    assert [(n, stat.S_ISDIR(m)) for n, m, _, _ in entries] == [
        ("proc", True), ("sys", True), ("dev", True), ("init", False)]
    assert entries[-1][3] == b"\x7fELF..." and entries[-1][1] & 0o111


CONSOLE = "\r\n".join([
    "SeaBIOS (version 1.16.2)", "\x1bc\x1b[?7l\x1b[2J",
    "kernel 6.1.0-57-amd64",
    "layout threads 2 cpus 2 mib 1 npages 256 each 128",
    "thp_enabled always madvise [never]",
    "thp_defrag always defer defer+madvise [madvise] never",
    "prefault_seconds 0.125",
    "zone DMA managed 3840 min 10 low 13 pcp_high 4 pcp_batch 1",
    "zone DMA32 managed 498292 min 1399 low 1895 pcp_high 252 pcp_batch 63",
    "zone Movable managed 0 min 0 low 0 pcp_high -1 pcp_batch -1",
    "thp_fault_alloc 0", "thp_fault_fallback 0",
    "runs",
    "0 1000 63",      # -> next starts 63 ahead
    "63 1126 63",     # -> 937 ahead
    "126 2126 10",    # -> 10 ahead
    "136 2146 100",   # -> behind
    "236 5 20",
    "end runs 5 notpresent 0",
    "[   11.8] reboot: Power down", ""])


def test_the_console_parser_reads_the_program_lines_among_the_firmwares():
    g = gl.parse_console(CONSOLE)
    assert (g.kernel, g.cpus, g.thp, g.thp_defrag) == ("6.1.0-57-amd64", 2, "never", "madvise")
    assert g.prefault_seconds == 0.125 and g.notpresent == 0
    assert g.runs == [(0, 1000, 63), (63, 1126, 63), (126, 2126, 10), (136, 2146, 100),
                      (236, 5, 20)]
    assert g.vmstat == {"thp_fault_alloc": 0, "thp_fault_fallback": 0}
    assert gl.main_zone(g.zones) == {"zone": "DMA32", "managed": 498292, "min": 1399,
                                     "low": 1895, "pcp_high": 252, "pcp_batch": 63}


def test_a_console_that_lost_runs_or_reports_an_error_fails():
    with pytest.raises(gl.Failure, match="printed 6 runs, 5 arrived"):
        gl.parse_console(CONSOLE.replace("end runs 5", "end runs 6"))
    with pytest.raises(gl.Failure, match="before 'end runs'"):
        gl.parse_console(CONSOLE.split("end runs")[0])
    with pytest.raises(gl.Failure, match="error mmap 1 MiB"):
        gl.parse_console("kernel 6.1\nerror mmap 1 MiB\n")


def test_steps_and_their_buckets_around_the_batch():
    runs = gl.parse_console(CONSOLE).runs
    assert gl.steps(runs) == [63, 937, 10, -2241]
    d = [-5, 0, 1, 63, 64, 511, 512, 4095, 4096, 65535, 65536, 10**6]
    assert gl.buckets(d, 63) == {"behind": 2, "1..63": 2, "64..511": 2, "512..4095": 2,
                                 "4096..65535": 2, ">=65536": 2}


def test_figures_of_the_synthetic_console():
    r = gl.figures(gl.parse_console(CONSOLE))
    assert (r["zone"], r["pcp_batch"], r["pcp_high"], r["thp"]) == ("DMA32", 63, 252, "never")
    assert (r["pages"], r["runs"], r["run_len_median"]) == (256, 5, 63)
    assert r["run_len_mean"] == 51.2 and r["runs_equal_batch_percent"] == 40.0
    assert r["steps"] == 4 and r["steps_equal_batch_percent"] == 25.0
    assert r["step_percent"] == {"behind": 25.0, "1..63": 50.0, "64..511": 0.0,
                                 "512..4095": 25.0, "4096..65535": 0.0, ">=65536": 0.0}
    run = {"package": "linux-image-6.1.0-57-amd64", "version": "6.1.192-3", "smp": 2,
           "threads": 2, "buffer_mib": 1, "ram_mib": 512, "host_cpus": 2, "host_load_1min": 1.5}
    text = gl.table(run | r)
    assert text.startswith("Linux 6.1.0-57-amd64 (linux-image-6.1.0-57-amd64 6.1.192-3), QEMU "
                           "TCG, -smp 2, -m 512MiB; host 2 CPUs, load 1.5\n")
    assert "  pcp (DMA32)        batch 63, high 252\n" in text
    assert "  run length         median 63, mean 51.2, 40% exactly 63 (the batch)\n" in text
    assert "    512..4095         25.0%\n" in text


@pytest.mark.parametrize("argv, says", [
    (["--smp", "0"], "argument --smp: expected an integer 1..255, got '0'"),
    (["--threads", "x"], "argument --threads: expected an integer 1..4096, got 'x'"),
    (["--buffer", "1.5MiB"], "argument --buffer: expected a whole number of MiB"),
    (["--ram", "lots"], "argument --ram: expected a size"),
    (["--buffer", "1900MiB"], "argument --buffer: expected at most --ram minus 256MiB (1792MiB)"),
    (["--thp", "madvise"], "argument --thp: invalid choice: 'madvise'"),
    (["--timeout", "-1"], "argument --timeout: expected seconds"),
])
def test_a_bad_option_is_one_line_naming_it_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        gl.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"guest_layout: {says}")


def test_threads_default_to_the_vcpus():
    assert gl.parse_args(["--smp", "4"]).threads == 4
    assert gl.parse_args(["--smp", "4", "--threads", "2"]).threads == 2


def test_too_little_memory_refuses_in_one_line_before_any_download(monkeypatch, capsys):
    monkeypatch.setattr(gl, "check_tools", lambda: None)
    monkeypatch.setattr(gl, "mem_available", lambda: 2048 * gl.MiB)
    monkeypatch.setattr(gl.tempfile, "mkdtemp", lambda **kw: pytest.fail("made a directory"))
    assert gl.main([]) == 2
    err = capsys.readouterr().err
    assert err == ("guest_layout: --ram 2048MiB plus 1024MiB for QEMU needs 3072MiB, "
                   "MemAvailable is 2048MiB\n")


def test_a_missing_tool_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(gl.shutil, "which", lambda t: None if t == "gcc" else "/bin/" + t)
    assert gl.main([]) == 2
    assert capsys.readouterr().err == ("guest_layout: needs gcc on PATH (apt, gcc with a "
                                       "static libc, QEMU); not found\n")


def test_the_script_itself_exits_2_on_a_bad_option():
    proc = subprocess.run([sys.executable, str(BENCH), "--smp", "300"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "guest_layout: argument --smp: expected an integer 1..255, got '300'\n"


def test_a_guest_that_hangs_is_killed_at_the_timeout(tmp_path, monkeypatch):
    started = []
    popen = gl.subprocess.Popen
    monkeypatch.setattr(gl.subprocess, "Popen",
                        lambda *a, **kw: started.append(popen(*a, **kw)) or started[-1])
    serial = tmp_path / "serial.log"
    serial.write_text("Booting from ROM...\r\n")
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(gl.Failure, match="did not power off within 0.5 s; last console line: "
                                         "Booting from ROM..."):
        gl.boot(hang, serial, 0.5)
    assert started[0].returncode is not None  # reaped: no orphan left running


@pytest.mark.parametrize("trouble, rc", [(KeyboardInterrupt, 130), (gl.Failure("boom"), 1)])
def test_the_temporary_directory_goes_on_error_and_ctrl_c(trouble, rc, tmp_path, monkeypatch):
    made = tmp_path / "guest_layout-x"
    monkeypatch.setattr(gl, "check_tools", lambda: None)
    monkeypatch.setattr(gl, "check_memory", lambda ram: None)
    monkeypatch.setattr(gl.tempfile, "mkdtemp", lambda **kw: made.mkdir() or str(made))

    def measure(args, tmp):
        (tmp / "vmlinuz").write_bytes(b"x")
        raise trouble
    monkeypatch.setattr(gl, "measure", measure)
    assert gl.main([]) == rc
    assert not made.exists() and tmp_path.exists()
