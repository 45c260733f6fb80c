"""postcopy-emu: the command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import sys
from contextlib import nullcontext

from emu import engines, signals, trace
from emu.backend import Backend
from emu.config import Config, ConfigError, load_config, scenario_names
from emu.figures import metrics
from emu.figures import progress as guest_progress
from emu.figures.report import integrity_text
from emu.migration import versions
from emu.units import format_duration, format_rate, format_size


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _trace_patterns(args)
        cfg = load_config(args.scenario, args.set)
        if args.command == "run":
            _faults_and_recovery(args, cfg)  # bad faults stop here, before any process starts
    except ConfigError as err:
        print(f"postcopy-emu: {err}", file=sys.stderr)
        return 2
    # SIGTERM and SIGHUP stop everything as Ctrl-C does; the window handles its own signals
    with nullcontext() if args.command == "gui" else signals.stopping():
        try:
            return args.func(args, cfg)
        except ConfigError as err:  # e.g. a guest.ram that does not fit in memory
            print(f"postcopy-emu: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:
            signum = getattr(stop, "signum", signal.SIGINT)
            why = "interrupted" if signum == signal.SIGINT else f"terminating on signal {signum}"
            print(f"\npostcopy-emu: {why}; everything stopped", file=sys.stderr)
            return 128 + signum


def _version() -> str:
    try:
        return importlib.metadata.version("postcopy-emu")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postcopy-emu",
        description="Emulate QEMU postcopy live migration and postcopy-preempt.",
        epilog="Every scenario key (--set section.key=value) is documented in docs/config.md; "
               "`postcopy-emu COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = _command(sub, "run", "run one migration to completion and report on it")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--csv", metavar="FILE",
                     help="write every page fault as CSV: time, vCPU, page, latency, channel, "
                          "how the page came and what it waited behind (docs/gui.md)")
    run.add_argument("--fault", action="append", default=[], metavar="'ACTION CHANNEL at TIME'",
                     help="break something during postcopy (repeatable): 'cut main at 0.3s', "
                          "'corrupt preempt at 50ms', 'pause at 0.2s'; TIME counts from the start "
                          "of postcopy, or is a state: 'cut main at postcopy-recover'")
    run.add_argument("--recover-after", default="200ms", metavar="DURATION",
                     help="emulated time after a pause before recovering automatically "
                          "(migrate-recover, then migrate resume); 'never' to stay paused "
                          "(default: 200ms)")
    _trace_argument(run, "print every state change, fault and recovery step on stderr, in "
                         "emulated-time order")
    _record_argument(run)
    run.set_defaults(func=cmd_run)
    predict = _command(sub, "predict", "predict the mean page-fault latency with the "
                       "analytical model, term by term (no migration runs)")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    predict.set_defaults(func=cmd_predict)
    bench = sub.add_parser("bench", help="run a benchmark that prints figures",
                           description="seed-table: the postcopy-preempt series' latency "
                                       "table (3 page sizes x 3 modes) under the seed-10g "
                                       "preset, next to the seed's figures and the model's; "
                                       "qemu: the same migrations on real QEMU "
                                       "(qemu-system-x86_64) and on the emulator, side by "
                                       "side; preempt-full-table: the preempt-full series' "
                                       "figures (2 write patterns x vanilla, 7.1 preempt, 8.0 "
                                       "preempt-full) under the preempt-full-10g preset")
    bench.add_argument("name", choices=["seed-table", "qemu", "preempt-full-table"])
    bench.add_argument("--quick", action="store_true",
                       help="seed-table: fewer samples (about a fifth), about 2 minutes "
                            "instead of about 6; qemu: a 64 MiB guest, one cap and one 2 MiB "
                            "scenario, about 4 minutes (the emulator's postcopy at the faithful "
                            "scale, each run's at most 30 s); preempt-full-table: 6 s of postcopy "
                            "a cell instead of 30, about 1 minute")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=cmd_bench, scenario=None, set=[])
    gui = _command(sub, "gui", "open the window")
    gui.add_argument("--screenshot", metavar="PATH", help="save a PNG of the window and exit")
    gui.add_argument("--run-for", type=float, default=5.0, metavar="SECONDS",
                     help="with --screenshot: real seconds to run before the capture")
    _record_argument(gui)
    gui.add_argument("--compare", nargs="+", metavar="RECORDING",
                     help="run the migration next to these recordings, side by side on one "
                          "timeline (the run is recorded too: in --record FILE, or in a "
                          "temporary file removed when the window closes)")
    gui.add_argument("--size", type=_window_size, metavar="WIDTHxHEIGHT",
                     help="the window's size in pixels, e.g. 1280x720 (default: what fits "
                          "the screen, up to 1600x1000; 1600x1000 for --screenshot)")
    gui.add_argument("--presentation", action="store_true",
                     help="open in presentation mode: large fonts, thick marks, no settings "
                          "column (F5 switches it, F9 shows the settings)")
    gui.set_defaults(func=cmd_gui)
    _replay_command(sub)
    _sweep_command(sub)
    _standalone_commands(sub)
    return parser


def _sweep_command(sub) -> None:
    sweep = _command(sub, "sweep", "run the scenario once per value of one or two keys and "
                     "tabulate and plot latency and guest progress, next to the model's")
    sweep.add_argument("--vary", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                       help="a key and the values it takes, e.g. guest.vcpus=1,4,16 (once or "
                            "twice: every combination runs; the plot has the first along x, "
                            "a line per value of the second)")
    sweep.add_argument("--out", default="sweep", metavar="DIR",
                       help="where the state file (sweep-state.jsonl, a line per point "
                            "measured: the same command resumes a stopped sweep), the CSV "
                            "and the PNG go (default: ./sweep)")
    sweep.add_argument("--csv", metavar="FILE", help="the table as CSV (default: DIR/sweep.csv)")
    sweep.add_argument("--png", metavar="FILE",
                       help="the plot: latency mean and p99 and guest progress against the "
                            "first key, the model's mean dashed (default: DIR/sweep.png)")
    sweep.add_argument("--json", action="store_true", help="print one JSON object")
    sweep.set_defaults(func=cmd_sweep)


def _record_argument(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--record", metavar="FILE",
                     help="record everything the window shows of the run in FILE, for "
                          "`postcopy-emu replay FILE` (the window numbers later runs FILE-2, "
                          "FILE-3, ...; the format is in docs/record.md)")


def _replay_command(sub) -> None:
    replay = sub.add_parser("replay", help="open the window on a recorded run, or several",
                            description="open the window on a run recorded with --record, "
                                        "without any engine process: play, pause, step, "
                                        "scrub the timeline; several runs side by side, with "
                                        "the difference against a baseline in words")
    replay.add_argument("files", nargs="+", metavar="FILE",
                        help="a recording (run/gui --record FILE); two or more: side by side "
                             "on one timeline, each against a baseline")
    replay.add_argument("--screenshot", metavar="PATH", help="save a PNG of the window and exit")
    replay.add_argument("--at", default="end", metavar="TIME",
                        help="the emulated instant to show first (and to capture with "
                             "--screenshot), e.g. 0.4s or 250ms; default: the end")
    replay.set_defaults(func=cmd_replay, scenario=None, set=[])


def _window_size(text: str) -> tuple[int, int]:
    """--size: "1280x720" -> (1280, 720)."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()) or not int(width) or not int(height):
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT in pixels, e.g. 1280x720")
    return int(width), int(height)


def _standalone_commands(sub) -> None:
    """source, destination and link: the migration as separate programs, like two QEMUs."""
    src = _command(sub, "source", "start the source side on its own, driven over QMP")
    dst = _command(sub, "destination", "start the destination side on its own, driven over QMP")
    dst.add_argument("--incoming", required=True, metavar="defer|URI",
                     help="listen for the migration at URI from the start, or wait for "
                          "migrate-incoming (defer), as QEMU's -incoming")
    for side in (src, dst):
        side.add_argument("--qmp", required=True, metavar="unix:PATH|tcp:HOST:PORT",
                          help="where to serve the QMP monitor")
        side.set_defaults(func=cmd_side)
    link = _command(sub, "link", "relay migration connections through the emulated network")
    link.add_argument("--listen", required=True, metavar="URI",
                      help="where the source connects (migrate's uri)")
    link.add_argument("--connect", required=True, metavar="URI",
                      help="where the destination listens (migrate-incoming's uri)")
    link.add_argument("--qmp", metavar="unix:PATH|tcp:HOST:PORT",
                      help="serve a QMP monitor with x-link-cut, x-link-corrupt, "
                           "x-link-connect and x-query-link")
    link.set_defaults(func=cmd_link)
    for cmd in (src, dst, link):
        cmd.add_argument("--allow-remote", action="store_true",
                         help="serve QMP on a non-loopback TCP address (whoever connects "
                              "controls the program)")
        _trace_argument(cmd, "print every state change (link: every connection) on stderr")


def _trace_argument(cmd: argparse.ArgumentParser, what: str) -> None:
    cmd.add_argument("--trace", action="append", nargs="?", const="", metavar="PATTERN",
                     help=f"{what}; with a PATTERN, the trace points it names as well, with "
                          f"their emulated times: QEMU's -trace patterns, e.g. "
                          f"'postcopy_preempt_*' (repeatable, or comma-separated; "
                          f"--trace=-NAME switches points off again)")


def _command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    cmd = sub.add_parser(name, help=help_text, description=help_text)
    cmd.add_argument("scenario", nargs="?", default=None,
                     help="scenario TOML file, or the name of a preset in assets/scenarios")
    cmd.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one setting (repeatable), e.g. --set link.rtt=1ms; "
                          "every key is in docs/config.md")
    return cmd


def cmd_run(args, cfg: Config) -> int:
    from emu.controller import migrate

    _warn_unmatched(args.trace)
    faults, recover_after = _faults_and_recovery(args, cfg)
    if recover_after is None:
        _say("--recover-after never: a paused run waits for a recovery that never comes; "
             "end it with Ctrl-C, or set emulator.duration-limit")
    engines.check_room(cfg, engines.ROLES)  # a guest that does not fit says only that
    cfg, choice = _time_scale(cfg)
    if choice is None and (expected := _real_seconds(cfg, 0.0)) > LONG_RUN_S:
        _say(f"this run takes about {_minutes(expected)} of real time "
             f"({format_size(cfg['guest.ram'])} over {format_rate(_stream_rate(cfg))} at "
             f"emulator.time-scale {cfg['emulator.time-scale']:g})")
    progress = _progress
    if args.trace is not None:
        progress = _tracer()
    elif args.json:
        progress = None
    at_end = _csv_writer(args.csv, cfg) if args.csv else None
    if args.record:
        result = _migrate_recorded(cfg, progress, faults, recover_after, args.trace or (),
                                   args.record, at_end)
    else:
        result = migrate(cfg, progress, faults, recover_after, args.trace or (), at_end)
    if choice is not None:
        result["emulator"]["time-scale-auto"] = choice.to_json()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(file=sys.stderr)
        print(summary(result, cfg))
    return 0 if result["status"] == "completed" and result["integrity"]["ok"] else 1


def _csv_writer(path: str, cfg: Config):
    """migrate()'s at_end: the faults as CSV, with the pages' final states (Qt-free)."""
    def write(run) -> None:
        from emu.figures import faultcsv, report

        count = faultcsv.write(path, report.fault_records(run), cfg.page_size, run.pages())
        _say(f"wrote {count} faults to {path}")
    return write


RECORD_TICK_S = 0.04  # a recorded run's frames are the window's: 25 a second


def _migrate_recorded(cfg: Config, progress, faults, recover_after, trace, path,
                      at_end=None) -> dict:
    """migrate(), read as the window reads it (gui.session, no Qt) and recorded in *path*:
    the run polls its children as migrate() does, and a frame is taken every RECORD_TICK_S;
    at_end(run) as migrate() calls it, before the processes go."""
    import time

    from emu.controller import RunError
    from gui.session import FINAL, RUNNING, Session

    session = Session(cfg, record=path, faults=faults, recover_after=recover_after,
                      trace=trace)
    session.start()
    next_progress = time.monotonic()
    said: list[str] = []  # the event log, for a run that ends without a report
    try:
        while session.phase not in FINAL:
            due = time.monotonic() + RECORD_TICK_S
            while session.phase == RUNNING and time.monotonic() < due:
                session.run.poll(max(due - time.monotonic(), 0))
            time.sleep(max(due - time.monotonic(), 0))
            said += session.tick().events
            if progress and session.phase == RUNNING and time.monotonic() >= next_progress:
                progress(session.run)
                next_progress += 0.5
        if at_end is not None and session.run is not None:
            at_end(session.run)
    finally:
        session.stop()
    if session.report is None:  # it did not get as far as a report: what it said instead
        errors = [line.partition("error: ")[2] for line in said if "error: " in line]
        raise RunError(errors[0] if errors else "the run ended without a report")
    if progress:
        progress(session.run)
    _say(f"recorded {path}")
    return session.report


def _time_scale(cfg: Config):
    """emulator.time-scale=auto chosen (a short calibration at most every few minutes), and
    said: the scale, why, and the real time the run takes."""
    from emu.figures import timescale

    if timescale.is_auto(cfg) and timescale.cached_cost() is None:
        _say("emulator.time-scale auto: measuring this machine's own cost (a second or two)")
    cfg, choice = timescale.resolve(cfg)
    if choice is not None:
        _say(f"emulator.time-scale auto: {timescale.describe(choice)}; this run takes about "
             f"{_minutes(_real_seconds(cfg, 0.0))} of real time")
    return cfg, choice


def cmd_predict(args, cfg: Config) -> int:
    from emu.figures import model, timescale

    cfg, _ = timescale.resolve(cfg, measure=False)  # predict runs nothing
    try:
        pred = model.predict(cfg)
    except model.ModelError as err:
        print(f"postcopy-emu: {err}", file=sys.stderr)
        return 2
    # the same guest and link in the other modes, for comparison
    modes = {mode: p["latency-us"] for mode, p in model.predict_all(cfg).items()}
    if args.json:
        print(json.dumps({**pred, "all-modes-us": modes}, indent=1))
        return 0
    print(model.format_prediction(pred))
    print("\n  the same scenario in each mode:")
    for mode, us in modes.items():
        print(f"  {model.MODE_TITLES[mode]:<34}{us / 1e3:10.3f} ms")
    return 0


def cmd_bench(args, cfg: Config) -> int:
    if args.name == "qemu":
        from emu.figures import qemu_bench

        return qemu_bench.main(args.quick, args.json)
    if args.name == "preempt-full-table":
        from emu.figures import preempttable

        return preempttable.main(args.quick, args.json)
    from emu.figures import seedtable

    return seedtable.main(args.quick, args.json)


def cmd_sweep(args, cfg: Config) -> int:
    from emu.figures import sweep, timescale

    plan = sweep.plan(args.scenario, args.set, args.vary)  # every point checked: exit 2 here
    for point in plan.points:
        engines.check_room(point.cfg, engines.ROLES)
    paths = sweep.outputs(args.out, args.csv, args.png)
    state = sweep.load_state(paths["state"], plan.signature)
    skipped = sum(p.ident in state.done for p in plan.points)
    if skipped:
        _say(f"{skipped} of {len(plan.points)} points already measured in {state.path}: "
             f"skipped")
    if state.foreign:
        _say(f"{state.foreign} points in {state.path} are of another base scenario: not used")
    todo = [p for p in plan.points if p.ident not in state.done]
    if any(timescale.is_auto(p.cfg) for p in todo) and timescale.cached_cost() is None:
        _say("emulator.time-scale auto: measuring this machine's own cost (a second or two)")
    measured = sweep.run(plan, state, _real_seconds, _say)
    sweep.write_csv(paths["csv"], plan.keys, measured)
    files = {"csv": str(paths["csv"]), "png": str(paths["png"])}
    try:
        from gui._qt import sweep_plot

        values = [v.values for v in plan.varies]
        sweep_plot.save(paths["png"], sweep.plot_series(plan.keys, values, measured))
    except ImportError as err:  # Qt's libraries missing: the table and CSV still stand
        if args.png:
            raise ConfigError(f"--png: Qt does not load ({err})") from None
        _say(f"no plot: Qt does not load ({err})")
        files["png"] = None
    if args.json:
        print(json.dumps(sweep.to_json(plan, state, measured, skipped, files), indent=1))
    else:
        print(sweep.table(plan.keys, measured))
        _say("wrote " + ", ".join(f for f in files.values() if f))
    return 0 if all(r["status"] == "completed" for r in measured) else 1


def cmd_gui(args, cfg: Config) -> int:
    if args.compare:
        from gui.record import Recording, RecordingError

        try:  # a bad file says so before any window or process
            args.compare = [Recording.open(file) for file in args.compare]
        except RecordingError as err:
            print(f"postcopy-emu: {err}", file=sys.stderr)
            return 2
    try:
        from gui._qt.app import main as gui_main
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) or ".so" not in str(err):
            raise  # not the dynamic loader's word on a library
        # Qt's own libraries need system ones the PySide6 wheel does not bring (libEGL, ...)
        from gui.display import RUN_INSTEAD, missing_libraries

        print(f"postcopy-emu: {missing_libraries(f'Qt does not load ({err})', RUN_INSTEAD)}",
              file=sys.stderr)
        return 2
    return gui_main(cfg, args)


def cmd_replay(args, cfg: Config) -> int:
    from emu.units import parse_duration
    from gui.record import Recording, RecordingError

    try:
        at = None if args.at == "end" else parse_duration(args.at)
        recordings = [Recording.open(file) for file in args.files]
    except ValueError as err:  # RecordingError is one
        what = "" if isinstance(err, RecordingError) else "--at: "
        print(f"postcopy-emu: {what}{err}", file=sys.stderr)
        return 2
    try:
        from gui._qt.app import replay_main
    except ImportError as err:
        if isinstance(err, ModuleNotFoundError) or ".so" not in str(err):
            raise
        from gui.display import missing_libraries

        print(f"postcopy-emu: {missing_libraries(f'Qt does not load ({err})')}",
              file=sys.stderr)
        return 2
    return replay_main(recordings, at, args.screenshot)


def cmd_side(args, cfg: Config) -> int:
    from emu.qmp import programs

    _warn_unmatched(args.trace)
    return programs.run_side(args.command, args, cfg)


def cmd_link(args, cfg: Config) -> int:
    from emu.qmp import programs

    _warn_unmatched(args.trace)
    return programs.run_link(args, cfg)


def _faults_and_recovery(args, cfg: Config):
    from emu import faults
    from emu.units import parse_duration

    found = faults.from_config(cfg, args.fault)
    if args.recover_after == "never":
        return found, None
    try:
        return found, parse_duration(args.recover_after)
    except ValueError as err:
        raise ConfigError(f"--recover-after: {err}") from None


def _trace_patterns(args) -> None:
    """args.trace as trace patterns (None without --trace). A word after a bare --trace that
    names a scenario, `run --trace seed-10g`, is the scenario, as before --trace took
    patterns: no trace point is named like a file or a preset."""
    if getattr(args, "trace", None) is None:
        return
    words = list(args.trace)
    if args.scenario is None and words[-1] and _names_scenario(words[-1]):
        args.scenario = words.pop()
    try:
        args.trace = trace.patterns(words)
    except ValueError as err:
        raise ConfigError(f"--trace: {err}") from None


def _warn_unmatched(patterns: tuple[str, ...] | None) -> None:
    """Once the engine's modules are imported (each declares its trace points): a pattern
    that names none of them is a typo, most likely; QEMU warns too."""
    for pattern in trace.unmatched(patterns or ()):
        print(f"postcopy-emu: warning: --trace: no trace point matches {pattern!r}",
              file=sys.stderr)


def _names_scenario(word: str) -> bool:
    return word in scenario_names() or os.path.isfile(word) or word.endswith(".toml")


def _tracer():
    shown = 0

    def trace(run) -> None:
        nonlocal shown
        new, shown = run.events(shown)
        for t, text in new:
            print(f"[{t * 1e3:10.3f} ms] {text}", file=sys.stderr)
    return trace


LONG_RUN_S = 30.0  # real seconds past which a run says beforehand how long it takes


def _say(text: str) -> None:
    print(f"postcopy-emu: {text}", file=sys.stderr, flush=True)


def _minutes(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _stream_rate(cfg: Config) -> float:
    """What the background stream moves per emulated second: the link, or a lower cap."""
    caps = [c for c in (cfg["migration.max-bandwidth"], cfg["migration.max-postcopy-bandwidth"])
            if c]
    return min([cfg["link.bandwidth"], *caps])


def _real_seconds(cfg: Config, present: float) -> float:
    """Real seconds a run still takes, roughly, once `present` of the guest is on the
    destination: the precopy time, then the rest of the RAM at the stream's rate."""
    emulated = (1 - present) * cfg["guest.ram"] / _stream_rate(cfg)
    if not present:
        emulated += cfg["migration.switchover-after"]
    return emulated / cfg["emulator.time-scale"]


def _progress(run) -> None:
    dst = run.board("destination")
    faults, _ = run.faults(max(0, run.fault_count - 200))
    avg = faults["latency"].mean() * 1e3 if len(faults) else 0.0
    present = dst["present"] / run.cfg.npages
    line = (f"\r[{run.clock.now():7.3f}s] {run.status['source']:>15} -> "
            f"{run.status['destination']:<15} present {present:6.1%}  "
            f"faults {int(dst['faults']):6d}  recent avg {avg:8.3f} ms  "
            f"~{_real_seconds(run.cfg, present):4.0f} s left ")
    print(line, end="", file=sys.stderr, flush=True)


def _headline(result: dict) -> str:
    emu = result["emulator"]
    auto = " (auto)" if "time-scale-auto" in emu else ""
    real = f"({emu['real-time-s']:.1f} s real at time-scale {emu['time-scale']:g}{auto})"
    if result["status"] == "completed":
        ms = result["query-migrate"]["total-time"]
        return f"postcopy-emu: completed in {ms} ms emulated {real}"
    # a failed run has no total time of its own: say how long it ran
    return f"postcopy-emu: failed after {result['reached']['time'] * 1e3:.0f} ms emulated {real}"


def _how_far(reached: dict) -> str:
    """How far a failed run got: each side's last state, the faults resolved until then."""
    sides = [f"{side} {reached[side]}" + (" (then its process died)"
                                          if side in reached["died"] else "")
             for side in ("source", "destination")]
    if "network" in reached["died"]:
        sides.append("the network process died")
    return (f"  reached: {', '.join(sides)}\n  by then {reached['page-faults']} page faults "
            f"resolved, {reached['present']:.1%} of the pages on the destination")


def _zero_pages(ram: dict) -> str:
    """The pages that went as zero pages (ram.duplicate), when there were any; and the bytes
    of them all on the multifd channels (ram.multifd-bytes), with multifd."""
    multifd = f", multifd {ram['multifd-bytes'] / 1e6:.1f} MB" if ram["multifd-bytes"] else ""
    return multifd + (f", {ram['duplicate']} zero pages (header only)" if ram["duplicate"]
                      else "")


def summary(result: dict, cfg: Config) -> str:
    qm, lat = result["query-migrate"], result["latency"]
    mode = "vanilla postcopy"
    if cfg["migration.postcopy-preempt"] and versions.preempt_full(cfg):
        mode = f"postcopy-preempt, {cfg['migration.design']} preempt-full"
    elif cfg["migration.postcopy-preempt"]:
        mode = "postcopy-preempt, break-huge " + (
            "on" if cfg["migration.x-postcopy-preempt-break-huge"] else "off")
    elif not cfg["migration.postcopy-ram"]:
        mode = "precopy only"
    if cfg["migration.multifd"]:
        mode += f"; multifd, {cfg['migration.multifd-channels']} channel(s)"
    switch = next((s["time"] for s in result["states"]["source"]
                   if s["status"] == "device"), 0.0)
    emu = result["emulator"]
    lines = [
        _headline(result),
        f"  {mode}; {format_size(cfg['guest.ram'])} guest of "
        f"{format_size(cfg.page_size)} pages, {cfg['guest.vcpus']} vCPU(s), "
        f"{cfg['workload.pattern']} workload",
        f"  link {format_rate(cfg['link.bandwidth'])}, rtt {format_duration(cfg['link.rtt'])}, "
        f"socket buffer {format_size(cfg['link.socket-buffer'])}",
        f"  emulator.backend: {Backend.of_report(emu).describe()}",
        f"  switchover at {switch * 1e3:.0f} ms, downtime {qm['downtime']} ms; transferred "
        f"{qm['ram']['transferred'] / 1e6:.1f} MB (precopy {qm['ram']['precopy-bytes'] / 1e6:.1f},"
        f" postcopy {qm['ram']['postcopy-bytes'] / 1e6:.1f})" + _zero_pages(qm["ram"]),
        f"  page faults {lat['count']}: avg {lat['avg-us'] / 1e3:.3f} ms, p50 "
        f"{lat['p50-us'] / 1e3:.3f}, p99 {lat['p99-us'] / 1e3:.3f}, max "
        f"{lat['max-us'] / 1e3:.3f} ms",
        "  delivered on " + ", ".join(
            f"{name} {ch['count']} (avg {ch['avg-us'] / 1e3:.3f} ms)"
            for name, ch in lat["by-channel"].items() if ch["count"]),
        f"  postcopy-requests {qm['ram']['postcopy-requests']}, "
        f"blocktime {result['blocktime-ms']['total']:.1f} ms",
        f"  guest progress in postcopy: {guest_progress.text(result['progress'])}",
        f"  integrity: {integrity_text(result['integrity'])}",
    ]
    if result["status"] != "completed":
        lines.insert(1, _how_far(result["reached"]))
    for fault in result["faults"]:
        if fault["action"] == "delay":  # no moment: every connection of that channel
            lines.append(f"  fault: delay {fault['channel']}-connect {fault['delay'] * 1e3:g} ms")
            continue
        what = fault["action"] + ("" if fault["action"] == "pause" else f" {fault['channel']}")
        lines.append(f"  fault: {what} at {fault['time'] * 1e3:.1f} ms")
    lines += [f"  error: {e}" for e in result["errors"]]
    lines += ["    " + line for tb in result["tracebacks"] for line in tb.splitlines()]
    if "warning" in emu:
        lines.append(f"  warning: {emu['warning']}")
    if lat["dist"]:
        lines += ["", "  page-fault latency (postcopy-latency-dist):",
                  metrics.histogram_text(lat["dist"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
