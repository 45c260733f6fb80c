"""What a finished run says: the memory check, query-migrate, latency, states, lag."""

from __future__ import annotations

import numpy as np

from emu.backend import Backend
from emu.config import Config
from emu.events import Trace
from emu.figures import integrity, metrics, model, timescale
from emu.figures import progress as guest_progress
from emu.migration.ram import PRESENT, TARGET_PAGE
from emu.migration.workload import SLICED, Workload

# ok is None, not False: nothing was compared, so nothing is known to be bad
NOT_CHECKED = {"ok": None, "bad-pages": None, "checked": "not checked: the run did not complete"}


def check_memory(cfg: Config, src_ram: np.ndarray, dst_ram: np.ndarray, dst_states: np.ndarray,
                 dst_report: dict) -> dict:
    """The destination's memory against the source's, the way the workload defines it."""
    missing = np.flatnonzero(dst_states < PRESENT)
    if not cfg["emulator.payload"]:
        return {"ok": not len(missing), "bad-pages": len(missing),
                "first-bad": missing[:20].tolist(), "checked": "page states only (no payload)"}
    src = src_ram.reshape(-1, TARGET_PAGE)
    dst = dst_ram.reshape(-1, TARGET_PAGE)
    nvcpus = cfg["guest.vcpus"]
    sliced = cfg["workload.pattern"] in SLICED
    bad = [integrity.check_rest(dst_ram, src_ram, 1 if sliced else nvcpus)]
    n = len(dst)
    for v in range(nvcpus):
        if sliced:  # in the order the vCPU walks its slice
            pages = Workload(cfg, v).slice_pages()
            bad.append(pages[integrity.check_step(dst[pages, 0])])
        else:
            bad.append(integrity.check_increments(dst[:, v], src[:, v],
                                                  dst_report["increments"][v]))
    bad_pages = np.unique(np.concatenate(bad))
    touches = dst_report["bad-touches"]
    return {"ok": not len(bad_pages) and not touches, "bad-pages": len(bad_pages),
            "first-bad": bad_pages[:20].tolist(), "bad-touches": touches,
            "checked": f"{n} target pages, content"}


def fault_records(run) -> np.ndarray:
    """Every resolved fault of *run*: the destination's final report has them all; a run that
    did not complete has none, and then the live record holds them."""
    dst = run.reports.get("destination", {})
    return dst["faults"] if "faults" in dst else run.faults(0)[0]


def build(run, integrity_result: dict | None, real_time: float) -> dict:
    cfg = run.cfg
    src = run.reports.get("source", {}).get("board") or run.board("source")
    faults = fault_records(run)
    latency = metrics.summarize(faults["latency"])
    latency["by-channel"] = {name: metrics.summarize(faults["latency"][faults["channel"] == i])
                             for i, name in enumerate(metrics.CHANNELS)}
    total_ms, per_vcpu_ms = metrics.blocktime(faults, cfg["guest.vcpus"])
    ok = run.ok and bool(integrity_result and integrity_result["ok"])
    reached = how_far(run, len(faults))
    if not src["total-time"]:  # the source sets it when it completes: as QEMU, the time so far
        src = {**src, "total-time": reached["time"] - _source_start(run)}
    return {
        "status": "completed" if ok else "failed",
        "errors": run.errors,
        "tracebacks": run.tracebacks,  # of the errors that were bugs in the emulator
        "reached": reached,
        "query-migrate": query_migrate(cfg, run.status["source"], src, faults),
        "latency": latency,
        # what the source's migration thread did with the requests it received
        "requests": {"urgent-main": int(src["urgent-main"]),
                     "urgent-preempt": int(src["urgent-preempt"]),
                     "dropped-already-sent": int(src["dropped-requests"]),
                     "break-huge": int(src["break-huge"])},
        "blocktime-ms": {"total": round(total_ms, 3),
                         "per-vcpu": [round(x, 3) for x in per_vcpu_ms]},
        "progress": progress(run, run.reports.get("destination", {}), reached["time"]),
        "integrity": integrity_result or dict(NOT_CHECKED),
        "states": {side: [{"status": s, "time": round(t, 6)} for s, t in changes]
                   for side, changes in run.states.items()},
        "faults": run.injected,
        "recoveries": run.recoveries,
        "events": [event_json(t, what) for t, what in run.events_in_order()],
        "emulator": {**with_cpu(emulator_health(cfg, run.board("destination"), latency,
                                                real_time),
                                cfg, {"source": src, "destination": run.board("destination")},
                                latency, reached["time"] - _source_start(run)),
                     **backend_json(run.backend)},
        "config": cfg.to_json(),
    }


def backend_json(backend: Backend) -> dict:
    """The backend the destination used; with emulator.backend=auto, what auto chose and, if
    it fell back to emulated, why (emu/backend.py)."""
    shown = {"backend": backend.name}
    if backend.auto:
        shown["backend-auto"] = backend.to_json()
    return shown


def progress(run, dst: dict, now: float) -> dict | None:
    """The guest's progress during postcopy (emu/figures/progress.py): from the destination's
    own count once it completed, else from what it published until the run ended."""
    cfg = run.cfg
    if dst.get("ended") is not None:
        return guest_progress.from_vcpus(dst["touches"], dst["ended"], "completed",
                                         cfg["workload.touch-cost"])
    return guest_progress.from_board(run.board("destination"), cfg["guest.vcpus"], now)


def event_json(t: float, what: str | Trace) -> dict:
    """One entry of the run's log; a trace point's with its name and fields too."""
    entry = {"time": round(t, 6), "event": str(what)}
    if isinstance(what, Trace):
        entry.update(trace=what.name, role=what.role,
                     fields={key: _plain(value) for key, value in what.fields.items()})
    return entry


def _plain(value: object) -> object:
    """A trace field as JSON takes it: numpy's numbers as Python's, anything else odd as
    its text."""
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def how_far(run, page_faults: int) -> dict:
    """Where the run ended: the emulated time, the last state each side reached (a side whose
    process died stays at the last state it reported), the page faults resolved and the share
    of the guest's pages on the destination. What a failed run's summary tells."""
    present = run.board("destination")["present"] / max(run.cfg.npages, 1)
    return {
        "time": round(run.clock.now(), 6),
        **{side: changes[-1][0] if changes else "none" for side, changes in run.states.items()},
        "died": sorted(run.dead),
        "page-faults": page_faults,
        "present": round(present, 6),
    }


def _source_start(run) -> float:
    changes = run.states["source"]
    return changes[0][1] if changes else 0.0


def integrity_text(integrity: dict) -> str:
    """The memory check in one phrase: "ok (...)", "BAD (...)", or why it was not checked.
    A run that did not complete was not checked, which is not the same as bad memory."""
    if integrity["ok"] is None:
        return integrity["checked"]
    word = "ok" if integrity["ok"] else "BAD"
    return f"{word} ({integrity['checked']}; bad pages {integrity['bad-pages']})"


def query_migrate(cfg: Config, status: str, b: dict, faults: np.ndarray) -> dict:
    """query-migrate as a QEMU pair would answer it between them: the source's fields (from
    its board `b`), then the destination's (from the faults it resolved)."""
    return {**source_migration_info(cfg, status, b), **destination_postcopy_info(cfg, faults)}


def source_migration_info(cfg: Config, status: str, b: dict) -> dict:
    """What the source knows of query-migrate, from its board `b`: the status,
    populate_time_info()'s times and populate_ram_info()'s RAM figures, with QEMU's field
    names and units (times in ms). QEMU's fill_source_migration_info() picks from these by
    status (emu/qmp/monitor.py); the run's report keeps them all."""
    return {"status": status, **populate_time_info(b), "ram": populate_ram_info(cfg, b)}


def populate_time_info(b: dict) -> dict:
    return {"total-time": round(b["total-time"] * 1e3), "downtime": round(b["downtime"] * 1e3),
            "setup-time": round(b["setup-time"] * 1e3)}


def populate_ram_info(cfg: Config, b: dict) -> dict:
    total_s = b["total-time"] or 1e-9
    return {
        "transferred": int(b["transferred"]),
        "remaining": int(b["remaining"]),
        "total": cfg["guest.ram"],
        "duplicate": int(b["duplicate"]),  # zero pages, header only (save_zero_page())
        "normal": int(b["normal"]),
        "normal-bytes": int(b["normal-bytes"]),
        "mbps": round(b["transferred"] * 8 / 1e6 / total_s, 3),
        "dirty-sync-count": int(b["dirty-sync-count"]),
        "postcopy-requests": int(b["postcopy-requests"]),
        "page-size": TARGET_PAGE,
        # ram_get_total_transferred_pages(): zero pages count as pages sent
        "pages-per-second": round((b["normal"] + b["duplicate"]) / total_s, 1),
        "precopy-bytes": int(b["precopy-bytes"]),
        "downtime-bytes": int(b["downtime-bytes"]),
        "postcopy-bytes": int(b["postcopy-bytes"]),
        "multifd-bytes": int(b.get("multifd-bytes", 0)),  # on the multifd channels
    }


def destination_postcopy_info(cfg: Config, faults: np.ndarray) -> dict:
    """What only the destination knows of query-migrate, from the faults its vCPUs resolved:
    QEMU's fill_destination_postcopy_migration_info(), the blocktime (with the
    postcopy-blocktime capability) and the fault latencies (QEMU 10.1's names; ms, ns)."""
    info: dict = {}
    if cfg["migration.postcopy-blocktime"]:
        total_ms, per_vcpu_ms = metrics.blocktime(faults, cfg["guest.vcpus"])
        info["postcopy-blocktime"] = round(total_ms)
        info["postcopy-vcpu-blocktime"] = [round(x) for x in per_vcpu_ms]
    lat, vcpus = faults["latency"], faults["vcpu"]
    info["postcopy-latency"] = round(float(lat.mean()) * 1e9) if len(lat) else 0
    info["postcopy-vcpu-latency"] = [
        round(float(lat[vcpus == v].mean()) * 1e9) if np.any(vcpus == v) else 0
        for v in range(cfg["guest.vcpus"])]
    info["postcopy-latency-dist"] = metrics.latency_dist(lat)
    return info


def emulator_health(cfg: Config, dst: dict, latency: dict, real_time: float) -> dict:
    """How late the destination got to the frames the link delivered, against their scheduled
    arrival, in emulated time: the relay or the destination falling behind the scaled clock.
    Lag is what this machine could not keep up with; it adds to every latency measured, and
    more than timescale.lag_bound() of the median distorts the figures."""
    frames = max(dst["rx-frames"], 1)
    lag_avg_us = dst["rx-lag-sum"] / frames * 1e6
    bound = timescale.lag_bound(latency["p50-us"] * 1e-6) * 1e6
    scale = cfg["emulator.time-scale"]
    health = {
        "time-scale": scale,
        "real-time-s": round(real_time, 3),
        "lag-avg-us": round(lag_avg_us, 1),
        "lag-max-us": round(dst["rx-lag-max"] * 1e6, 1),
        "frames": int(dst["rx-frames"]),
        "keeping-up": lag_avg_us <= bound,
    }
    if not health["keeping-up"]:
        faithful = timescale.suggest(scale, lag_avg_us * 1e-6, latency["p50-us"] * 1e-6 or None,
                                     cfg["link.bandwidth"] / cfg["emulator.chunk"])
        health["faithful-time-scale"] = faithful
        health["warning"] = (
            f"the emulator fell behind the link's schedule by {lag_avg_us:.0f} us on average "
            f"(max {health['lag-max-us']:.0f} us) in emulated time, more than {bound:.0f} us "
            f"({timescale.FIDELITY:.0%} of the median latency): the figures are distorted by "
            f"that much; for faithful ones run again with "
            f"--set emulator.time-scale={faithful:g} (now {scale:g})")
    return health


SATURATED = 0.9  # busy share of a receiving thread above which it no longer keeps up
CPU_THREADS = {"source": ("migration", "return-path"),
               "destination": ("listen", "preempt", "fault")}


def with_cpu(health: dict, cfg: Config, boards: dict[str, dict], latency: dict,
             elapsed: float) -> dict:
    """The emulator's health with the CPU time charged to QEMU's threads (emu/cpu.py): per
    thread, the emulated time charged and the acts it delayed; per fault, what the model says
    the charges add (t) next to the emulator's own work, model.SOFTWARE_COST_S x time-scale,
    which comes on top. When the own work is larger by more than the lag's bound
    (timescale.lag_bound of the median latency), the charged costs do not decide the figures:
    the warning says so, with the time scale at which they would. A receiving thread busy nearly
    all of the run (`elapsed` emulated seconds) is slower than the link: its backlog, held to
    link.socket-buffer as in TCP (the receiver's reads free the window), drains at the thread's
    rate, not the link's, and the warning says that too."""
    threads = {}
    for side, names in CPU_THREADS.items():
        for name in names:
            busy = boards[side].get(f"cpu-{name}-busy", 0.0)
            threads[name] = {"busy-ms": round(busy * 1e3, 3),
                             "acts": int(boards[side].get(f"cpu-{name}-acts", 0)),
                             "busy-share": round(busy / elapsed, 3) if elapsed > 0 else 0.0}
    cpu = {"threads": threads}
    for name in ("listen", "preempt"):
        if threads[name]["busy-share"] > SATURATED:
            _warn(health, f"the {name} thread was busy placing pages "
                          f"{threads[name]['busy-share']:.0%} of the run (cpu.place-*): slower "
                          f"than the link, its backlog drains at its rate, not the link's")
    if cfg["migration.postcopy-ram"]:
        charged = model.cpu_time(cfg, model.mode_of(cfg), 0.0)
        scale = cfg["emulator.time-scale"]
        own = model.SOFTWARE_COST_S * scale
        cpu.update({"charged-per-fault-us": round(charged * 1e6, 1),
                    "own-per-fault-us": round(own * 1e6, 1)})
        bound = timescale.lag_bound(latency["p50-us"] * 1e-6)
        if own - charged > bound and charged > 0:
            faithful = (charged + bound) / model.SOFTWARE_COST_S
            text = (f"the emulator's own work per fault (~{own * 1e6:.0f} us at time-scale "
                    f"{scale:g}) exceeds the CPU time charged to QEMU's threads per fault "
                    f"({charged * 1e6:.1f} us, cpu.*): the thread costs are hidden under it; "
                    f"--set emulator.time-scale={faithful:.2g} resolves them")
            _warn(health, text)
    health["cpu"] = cpu
    return health


def _warn(health: dict, text: str) -> None:
    health["warning"] = f"{health['warning']}; {text}" if "warning" in health else text
