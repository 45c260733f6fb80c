"""What the window says about migration.design, without Qt (tested without a window): the
sentence under the urgent pages, why a control is off for a design, and the trace points whose
lines tell the design's story in the event log."""

from __future__ import annotations

from emu.config import BREAK_HUGE, MULTIFD_NO_POSTCOPY, REMOVED, Config
from emu.migration.ram import TARGET_PAGE

# The decisions that make an urgent page's path, one point each (emu/trace.py); never the
# rate-limit steps (migration_rate_limit_*: one every few ms of background), which would bury
# them. The session shows a few of these lines per 100 ms at most (gui.session.TraceLimiter).
WINDOW_TRACE = (
    "get_queued_page",  # 7.1 and vanilla: the migration thread takes a request off the queue
    "postcopy_preempt_triggered",  # 7.1 break-huge: it leaves a huge page for the request
    "postcopy_preempt_restored",  # ... and comes back to it
    "postcopy_preempt_send_host_page",  # 8.0, 10.1: the return-path thread sends it itself
    "postcopy_preempt_hit",  # 8.0, 10.1: main is sending that very page: left to main
    "ram_page_hint_update",  # 10.1: the background to go on just past the page
    "postcopy_preempt_new_channel",  # the preempt channel is up at the destination
    "multifd_send_sync_main",  # multifd flushed and synced (before postcopy, with 10.1)
)


def urgent_path(cfg: Config) -> str:
    """In plain words, what the chosen design does with an urgent page (the sentence under
    the urgent pages)."""
    design = cfg["migration.design"]
    if not cfg["migration.postcopy-ram"]:
        return "Precopy only: no page is urgent, the guest runs on the source until the end."
    if not cfg["migration.postcopy-preempt"]:
        return ("Vanilla postcopy: the migration thread sends an urgent page on main, "
                "behind the background pages already queued there.")
    if design == "7.1":
        return _path_71(cfg)
    text = (f"QEMU {design}: the return-path thread sends an urgent page on preempt at once, "
            f"as soon as it reads the request")
    if design == "8.0":
        return text + "; the migration thread only streams the background."
    return text + ", and the background stream continues just past that page."


def _path_71(cfg: Config) -> str:
    text = ("QEMU 7.1: the migration thread sends an urgent page on preempt the next time it "
            "looks at its queue")
    if cfg.page_size > TARGET_PAGE and cfg[BREAK_HUGE]:
        text += ", between two pieces of a huge page (break-huge)"
    if cfg["migration.max-postcopy-bandwidth"] and cfg.page_size == TARGET_PAGE:
        text += ("; under the background cap, a request made while it sleeps waits for "
                 "the next 100 ms window")
    return text + "."


def removed(key: str, design: str) -> str | None:
    """Why *key* is not a setting of *design* (QEMU removed the property), or None."""
    if key not in REMOVED.get(design, ()):
        return None
    return (f"QEMU 8.0 removed {key.partition('.')[2]}: the return-path thread sends urgent "
            f"pages itself, nothing waits for a huge page to break (migration.design={design})")


def multifd_refused(design: str, postcopy: bool) -> str | None:
    """Why multifd cannot be switched on with *design*, or None: QEMU's migrate_caps_check()
    words, as the engine gives them."""
    if not postcopy or design not in MULTIFD_NO_POSTCOPY:
        return None
    return (f"Postcopy is not yet compatible with multifd (QEMU {design}); "
            f"migration.design 10.1 allows both")
