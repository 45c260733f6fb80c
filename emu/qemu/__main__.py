"""Run one migration on real QEMU by hand and print its figures:

    python -m emu.qemu --pattern stride --mode preempt --postcopy-bandwidth 10MB/s
    python -m emu.qemu --json ...      # the figures and each request's times as JSON
    python -m emu.qemu --hugepages ... # guest RAM on 2 MiB huge pages (mount, pool; undone)
    python -m emu.qemu --loopback      # loopback TCP throughput, for the emulator's link

Exit status 0 with one line on stderr when QEMU cannot run here (emu.qemu.available()).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from contextlib import ExitStack

from emu import signals
from emu.qemu import available, harness, hugepages, loopback
from emu.qemu.guest import PATTERNS
from emu.units import parse_duration, parse_rate, parse_size


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.loopback:
        print(json.dumps(loopback.measure(), indent=1))
        return 0
    if (why := available()) is not None:
        print(f"postcopy-emu: real QEMU cannot run here: {why}", file=sys.stderr)
        return 0
    settings = dict(
        pattern=args.pattern, mode=args.mode, ram=parse_size(args.ram),
        max_bandwidth=round(parse_rate(args.bandwidth)),
        max_postcopy_bandwidth=round(parse_rate(args.postcopy_bandwidth)),
        precopy=parse_duration(args.precopy), hugetlbfs=args.hugetlbfs, accel=args.accel,
        trace_rate_limit=args.trace_rate_limit)
    try:
        with ExitStack() as stack:
            if args.hugepages:
                settings["hugetlbfs"] = stack.enter_context(
                    hugepages.hugetlbfs(2 * settings["ram"]))
            result = harness.run(harness.Scenario(**settings), keep_traces=args.keep_traces)
    except (harness.HarnessError, hugepages.HugepagesError) as e:
        print(f"postcopy-emu: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_as_json(result), indent=1))
    else:
        _print(result)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emu.qemu", description=__doc__.split("\n")[0])
    p.add_argument("--pattern", choices=PATTERNS, default="stride")
    p.add_argument("--mode", choices=harness.MODES, default="vanilla")
    p.add_argument("--ram", default="256MiB")
    p.add_argument("--bandwidth", default="0", help="max-bandwidth (precopy); 0 = unlimited")
    p.add_argument("--postcopy-bandwidth", default="0",
                   help="max-postcopy-bandwidth; 0 = unlimited")
    p.add_argument("--precopy", default="1s", help="time from migrate to migrate-start-postcopy")
    huge = p.add_mutually_exclusive_group()
    huge.add_argument("--hugetlbfs", help="a hugetlbfs mount point to back guest RAM with")
    huge.add_argument("--hugepages", action="store_true",
                      help="back guest RAM with 2 MiB huge pages: an existing hugetlbfs mount "
                           "or a private one, nr_hugepages raised by what the run lacks "
                           "(root), both undone afterwards")
    p.add_argument("--accel", default="tcg")
    p.add_argument("--trace-rate-limit", action="store_true",
                   help="trace migration_rate_limit_pre/post too (many lines under a cap)")
    p.add_argument("--keep-traces", metavar="DIR",
                   help="copy both trace logs into DIR (source.trace, destination.trace)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--loopback", action="store_true", help="measure loopback TCP throughput")
    return p


def _as_json(result: harness.Result) -> dict:
    return {"qemu": result.version, "scenario": vars(result.scenario),
            "summary": result.summary(), "touches": result.touches, "window-s": result.window,
            "start": vars(result.start), "end": vars(result.end), "verified": result.verified,
            "phases": result.phases(), "source": result.source,
            "destination": result.destination}


def _print(result: harness.Result) -> None:
    s, ph = result.summary(), result.phases()
    sc = result.scenario
    print(f"QEMU {result.version}: {sc.pattern} guest, {sc.ram >> 20} MiB, {sc.mode}, "
          f"max-postcopy-bandwidth {sc.max_postcopy_bandwidth} B/s")
    print(f"  requests {s['count']}: median {s['median-ms']} ms, mean {s['mean-ms']} ms, "
          f"p99 {s['p99-ms']} ms; blocktime {s['blocktime-ms']} ms; "
          f"progress {s['progress']} touches/s; memory verified: {result.verified}")
    if ph["requests"]:
        print(f"  phases (medians): to source {ph['to-source-ms']} ms, queued at source "
              f"{ph['queued-ms']} ms, taken to woken {ph['to-woken-ms']} ms")
    if ph.get("waited-at-source"):
        print(f"  {ph['waited-at-source']} of {ph['requests']} reached the source within 1 ms "
              f"and waited there 10 ms or more (median {ph['waited-median-ms']} ms, the last "
              f"{ph['silent-ms']} ms with no page placed at all)")


if __name__ == "__main__":
    # SIGTERM and SIGHUP stop it as Ctrl-C does: the QEMUs are killed, and a private
    # hugetlbfs mount and the pages added to the pool are given back on the way out
    with signals.stopping():
        try:
            sys.exit(main())
        except KeyboardInterrupt as stop:
            signum = getattr(stop, "signum", signal.SIGINT)
            print(f"\npostcopy-emu: stopped on signal {signum}; everything undone",
                  file=sys.stderr)
            sys.exit(128 + signum)
