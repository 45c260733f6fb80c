"""Where a real Linux 6.1 guest puts a buffer that several threads prefault at once.

    python bench/guest_layout.py [--smp 20] [--threads N] [--buffer 1536MiB] [--ram 2048MiB]
                                 [--thp never|always] [--timeout 600] [--json]

QEMU migrates guest RAM in guest-physical (PFN) order, but a guest program writes its buffer in
virtual order. How far apart the two orders are decides which pages a migration sends before
the guest dirties them again, so this measures it on a real guest kernel rather than assuming.

It downloads Debian's newest linux-image-6.1.*-amd64 with apt-get, builds bench/guest_layout.c
as a static /init, boots it under qemu-system-x86_64 (TCG: KVM guests hang on this VM), and
reads back from the serial console the buffer's runs of pages that are consecutive both
virtually and physically. It prints the runs, the per-CPU page list (pcp) batch and high the
guest used (each refill takes `batch` pages from the buddy lists, so runs tend to be `batch`
long), the THP setting in effect, and the writer's steps: the signed PFN distance from the end
of one run to the start of the next run in virtual order, which is where a sequential writer
jumps to in QEMU's scan order. Everything goes in one temporary directory, removed at the end.

The steps depend on how many vCPUs really fault at the same time, so on the host's free cores:
the host's CPU count and load average before the boot are part of the result.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's emu

from emu.units import parse_size  # noqa: E402

PROG = "guest_layout"
SOURCE = Path(__file__).with_suffix(".c")
MiB = 1 << 20
PAGE = 4096
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "gcc", "qemu-system-x86_64")
KERNEL = re.compile(r"linux-image-6\.1\.(\d+)-(\d+)-amd64")
# What the guest's RAM needs on top in the host: TCG's translation cache (up to 1 GiB by
# default) and QEMU itself; the rest of MemAvailable stays with the others sharing the host.
HOST_MARGIN = 1024 * MiB
# The guest kernel, its page tables and the pagemap copy need this much beside the buffer.
GUEST_MARGIN = 256 * MiB
MAX_SMP = 255  # the pc machine's limit
MAX_THREADS = 4096


class Refusal(Exception):
    """The run cannot start here (a missing tool, too little memory): exit 2."""


class Failure(Exception):
    """The run started and went wrong: exit 1."""


# ---- arguments ----

class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the option, not argparse's usage block
        self.exit(2, f"{self.prog}: {message}\n")


def _ranged_int(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer {lo}..{hi}, got {text!r}")
        return value
    return parse


def _mib(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < MiB or size % MiB:
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB, at least 1MiB, "
                                         f"got {text!r}")
    return size // MiB


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected seconds in (0, 86400], got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--smp", type=_ranged_int(1, MAX_SMP), default=20, help="guest vCPUs")
    p.add_argument("--threads", type=_ranged_int(1, MAX_THREADS), default=None,
                   help="prefault threads (default: one per vCPU)")
    p.add_argument("--buffer", type=_mib, default=1536, help="buffer size (default 1536MiB)")
    p.add_argument("--ram", type=_mib, default=2048, help="guest RAM (default 2048MiB)")
    p.add_argument("--thp", choices=("never", "always"), default="never",
                   help="transparent_hugepage= on the guest's command line")
    p.add_argument("--timeout", type=_seconds, default=600.0, help="seconds the boot may take")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.buffer + GUEST_MARGIN // MiB > args.ram:
        p.error(f"argument --buffer: expected at most --ram minus {GUEST_MARGIN // MiB}MiB "
                f"({args.ram - GUEST_MARGIN // MiB}MiB), got {args.buffer}MiB")
    if args.threads is None:
        args.threads = args.smp
    return args


# ---- the host ----

def check_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise Refusal(f"needs {', '.join(missing)} on PATH (apt, gcc with a static libc, "
                      f"QEMU); not found")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise Refusal("no MemAvailable in /proc/meminfo")


def check_memory(ram_mib: int) -> None:
    need, have = ram_mib * MiB + HOST_MARGIN, mem_available()
    if need > have:
        raise Refusal(f"--ram {ram_mib}MiB plus {HOST_MARGIN // MiB}MiB for QEMU needs "
                      f"{need // MiB}MiB, MemAvailable is {have // MiB}MiB")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise Failure(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}): {last}")
    return proc


def newest_kernel() -> str:
    names = _run(["apt-cache", "pkgnames", "linux-image-6.1."]).stdout.split()
    found = [(int(m[1]), int(m[2]), n) for n in names if (m := KERNEL.fullmatch(n))]
    if not found:
        raise Refusal("apt-cache lists no linux-image-6.1.*-amd64 (run apt-get update?)")
    return max(found)[2]


def fetch_kernel(package: str, tmp: Path) -> tuple[Path, str]:
    """The package's vmlinuz in tmp, and the package's version. Only ./boot/vmlinuz-* is
    taken out of the .deb: the modules beside it are most of its 400 MB unpacked."""
    _run(["apt-get", "download", package], cwd=tmp)
    [deb] = tmp.glob(f"{package}_*.deb")
    version = deb.name.split("_")[1]
    out = tmp / "vmlinuz"
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE) as dpkg:
        try:
            with tarfile.open(fileobj=dpkg.stdout, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.startswith("./boot/vmlinuz-"):
                        out.write_bytes(tar.extractfile(member).read())
                        break
        finally:
            dpkg.kill()  # it may still be writing the modules we do not want
    deb.unlink()
    if not out.exists():
        raise Failure(f"{deb.name} holds no ./boot/vmlinuz-*")
    return out, version


def build_guest(tmp: Path) -> bytes:
    exe = tmp / "init"
    _run(["gcc", "-O2", "-Wall", "-static", "-pthread", "-o", str(exe), str(SOURCE)])
    return exe.read_bytes()


# ---- the initramfs: newc cpio, as the kernel unpacks it (no cpio binary on this host) ----

def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc ("070701") archive of (name, mode, data), with the trailer. Header and name
    together, and the data, are each padded to 4 bytes."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + "".join(f"{v:08X}" for v in fields).encode() + encoded
        out += _pad4(len(out))
        out += data + _pad4(len(data))
    return bytes(out)


def initramfs(init: bytes) -> bytes:
    dirs = [(d, stat.S_IFDIR | 0o755, b"") for d in ("proc", "sys", "dev")]
    return gzip.compress(newc([*dirs, ("init", stat.S_IFREG | 0o755, init)]), mtime=0)


# ---- the boot ----

def qemu_command(args: argparse.Namespace, kernel: Path, initrd: Path, serial: Path) -> list:
    append = (f"console=ttyS0 quiet transparent_hugepage={args.thp} panic=-1 "
              f"LMB={args.buffer} LT={args.threads}")
    return ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-smp", str(args.smp),
            "-m", f"{args.ram}M", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", append, "-display", "none", "-serial", f"file:{serial}",
            "-monitor", "none", "-no-reboot"]


def boot(cmd: list[str], serial: Path, timeout: float) -> str:
    """The guest's console once it powers itself off. QEMU never outlives this call."""
    errors = serial.with_name("qemu.err")
    with open(errors, "w") as err:
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        rc = qemu.wait(timeout)
    except subprocess.TimeoutExpired:
        raise Failure(f"the guest did not power off within {timeout:g} s; last console "
                      f"line: {_last_line(serial)}") from None
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
    if rc:
        raise Failure(f"qemu-system-x86_64 exited {rc}: {_last_line(errors)}")
    return serial.read_text(errors="replace")


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").replace("\r", "").strip().splitlines()
    return lines[-1] if lines else "(none)"


# ---- the console ----

@dataclass
class Guest:
    kernel: str = "?"
    cpus: int = 0
    thp: str = "?"
    thp_defrag: str = "?"
    prefault_seconds: float = 0.0
    zones: list[dict] = field(default_factory=list)
    vmstat: dict[str, int] = field(default_factory=dict)
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    notpresent: int = 0


def _selected(line: str) -> str:
    """The word in brackets of a sysfs choice line: "always madvise [never]" -> never."""
    m = re.search(r"\[(\S+)\]", line)
    return m[1] if m else line.strip()


RUN = re.compile(r"(\d+) (\d+) (\d+)")


def parse_console(text: str) -> Guest:
    """The guest program's lines (see guest_layout.c) out of its console; firmware and
    kernel lines around them are ignored. Fails on the program's "error" line or when the
    runs did not all arrive."""
    g, in_runs, end = Guest(), False, None
    for line in text.replace("\r", "").splitlines():
        key, _, rest = line.partition(" ")
        if in_runs and (m := RUN.fullmatch(line)):
            g.runs.append((int(m[1]), int(m[2]), int(m[3])))
        elif key == "runs" and not rest:
            in_runs = True
        elif line.startswith("end runs "):
            end = line.split()
            in_runs = False
        elif key == "error":
            raise Failure(f"the guest program failed: {line}")
        elif key == "kernel":
            g.kernel = rest.strip()
        elif key == "layout":
            words = rest.split()
            g.cpus = int(words[words.index("cpus") + 1])
        elif key == "thp_enabled":
            g.thp = _selected(rest)
        elif key == "thp_defrag":
            g.thp_defrag = _selected(rest)
        elif key == "prefault_seconds":
            g.prefault_seconds = float(rest)
        elif key == "zone":
            words = rest.split()
            g.zones.append({"zone": words[0],
                            **{k: int(v) for k, v in zip(words[1::2], words[2::2], strict=False)}})
        elif key.startswith("thp_fault_") and rest.strip().isdigit():
            g.vmstat[key] = int(rest)
    if end is None:
        raise Failure("the guest's console ends before 'end runs' (see the serial output)")
    if int(end[2]) != len(g.runs):
        raise Failure(f"the guest printed {end[2]} runs, {len(g.runs)} arrived intact")
    g.notpresent = int(end[4])
    return g


# ---- the figures ----

def steps(runs: list[tuple[int, int, int]]) -> list[int]:
    """Signed PFN distance from the end of each run to the start of the next, in virtual
    order: 63 means the writer skips 63 pages of QEMU's scan order; behind is negative."""
    return [b[1] - (a[1] + a[2]) for a, b in pairwise(runs)]


def bucket_names(batch: int) -> list[str]:
    return ["behind", f"1..{batch}", f"{batch + 1}..511", "512..4095", "4096..65535",
            ">=65536"]


def buckets(d: list[int], batch: int) -> dict[str, int]:
    """Steps counted as in the hand measurement. Two adjacent runs are never 0 apart (they
    would be one run); 0 happens only across a page that is not present, and counts as
    behind: the writer does not move ahead."""
    edges = [1, batch + 1, 512, 4096, 65536]
    counts = dict.fromkeys(bucket_names(batch), 0)
    names = list(counts)
    for x in d:
        counts[names[sum(x >= e for e in edges)]] += 1
    return counts


def _percent(n: int, total: int) -> float:
    return round(100 * n / total, 1) if total else 0.0


def _median(xs: list[int]) -> float:
    m = statistics.median(xs) if xs else 0
    return int(m) if m == int(m) else m


def main_zone(zones: list[dict]) -> dict:
    """The zone with the most managed pages: where the buffer mostly comes from."""
    if not zones:
        raise Failure("the guest printed no zone lines")
    return max(zones, key=lambda z: z.get("managed", 0))


def figures(g: Guest) -> dict:
    zone = main_zone(g.zones)
    batch = zone["pcp_batch"]
    lengths = [r[2] for r in g.runs]
    d = steps(g.runs)
    counts = buckets(d, batch)
    return {
        "kernel": g.kernel, "cpus_online": g.cpus, "thp": g.thp, "thp_defrag": g.thp_defrag,
        "thp_fault_alloc": g.vmstat.get("thp_fault_alloc"),
        "thp_fault_fallback": g.vmstat.get("thp_fault_fallback"),
        "prefault_seconds": g.prefault_seconds,
        "zone": zone["zone"], "pcp_batch": batch, "pcp_high": zone["pcp_high"],
        "zones": g.zones,
        "pages": sum(lengths), "notpresent": g.notpresent, "runs": len(lengths),
        "run_len_median": _median(lengths),
        "run_len_mean": round(statistics.fmean(lengths), 1) if lengths else 0,
        "runs_equal_batch_percent": _percent(lengths.count(batch), len(lengths)),
        "steps": len(d),
        "step_median": _median(d),
        "steps_equal_batch_percent": _percent(d.count(batch), len(d)),
        "step_percent": {k: _percent(n, len(d)) for k, n in counts.items()},
        "step_count": counts,
    }


def table(r: dict) -> str:
    b = r["pcp_batch"]
    rows = [
        ("THP in effect", f"{r['thp']} (defrag {r['thp_defrag']}); thp_fault_alloc "
                          f"{r['thp_fault_alloc']}, thp_fault_fallback {r['thp_fault_fallback']}"),
        (f"pcp ({r['zone']})", f"batch {b}, high {r['pcp_high']}"),
        ("runs", f"{r['runs']}"),
        ("run length", f"median {r['run_len_median']:g}, mean {r['run_len_mean']:g}, "
                       f"{r['runs_equal_batch_percent']:g}% exactly {b} (the batch)"),
        ("writer steps", f"{r['steps']} (PFN distance, end of a run to the start of the next "
                         f"in virtual order)"),
        *((f"  {k}", f"{v:5.1f}%") for k, v in r["step_percent"].items()),
        ("step median", f"{r['step_median']:g}, {r['steps_equal_batch_percent']:g}% exactly {b}"),
    ]
    head = [f"Linux {r['kernel']} ({r['package']} {r['version']}), QEMU TCG, -smp {r['smp']}, "
            f"-m {r['ram_mib']}MiB; host {r['host_cpus']} CPUs, load {r['host_load_1min']:g}",
            f"  buffer {r['buffer_mib']} MiB = {r['pages']} pages ({r['notpresent']} not "
            f"present), {r['threads']} threads, prefault {r['prefault_seconds']:.1f} s"]
    return "\n".join(head + [f"  {label:18s} {value}" for label, value in rows])


# ---- the run ----

def say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    package = newest_kernel()
    say(f"downloading {package}")
    kernel, version = fetch_kernel(package, tmp)
    initrd = tmp / "init.cpio.gz"
    initrd.write_bytes(initramfs(build_guest(tmp)))
    check_memory(args.ram)  # again: the download took a while, the host is shared
    serial = tmp / "serial.log"
    say(f"booting: -smp {args.smp} -m {args.ram}M, {args.threads} threads prefault "
        f"{args.buffer} MiB, THP {args.thp}")
    load, t0 = os.getloadavg()[0], time.monotonic()
    text = boot(qemu_command(args, kernel, initrd, serial), serial, args.timeout)
    result = {"package": package, "version": version, "smp": args.smp,
              "threads": args.threads, "buffer_mib": args.buffer, "ram_mib": args.ram,
              "thp_requested": args.thp, "host_cpus": os.cpu_count(),
              "host_load_1min": round(load, 2), "boot_seconds": round(time.monotonic() - t0, 1)}
    return result | figures(parse_console(text))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_tools()
        check_memory(args.ram)
        tmp = Path(tempfile.mkdtemp(prefix="guest_layout-"))
        try:
            result = measure(args, tmp)
        finally:
            shutil.rmtree(tmp)
    except Refusal as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except Failure as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
