"""The listen and preempt threads: each reads one channel and loads what it carries (QEMU:
savevm.c's qemu_loadvm_state_main() and loadvm_process_command(), ram.c's ram_load_postcopy(),
and postcopy-ram.c's preempt thread).

The main channel carries RAM records, the device state and the MIG_CMD_* commands; the preempt
channel RAM records only. RAM records go to the Placer (placement.py); each command calls the
destination's state machine (destination.py) where the migration's state changes. A channel that
breaks pauses or fails the migration (Destination.channel_failed); a stream that parses but does
not fit this destination fails it (LoadError, QEMU's "load of migration failed").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu import trace
from emu.config import Config
from emu.migration import ram as R
from emu.migration import wire
from emu.migration.placement import MAIN
from emu.migration.workload import MAX_POS
from emu.net.channel import ChannelError, Endpoint

if TYPE_CHECKING:
    from emu.migration.destination import Destination

# QEMU's PostcopyState, for its "CMD_POSTCOPY_RUN in wrong postcopy state (%d)"
PS_NONE, PS_ADVISE, PS_LISTENING, PS_RUNNING = 0, 1, 3, 4

# loadvm_process_command(com, len): every MIG_CMD_* the listen thread takes in, by QEMU's name
TRACE_COMMAND = trace.point("loadvm_process_command")


class LoadError(ValueError):
    """The stream parses, but what it says does not fit this destination: the incoming
    migration fails (QEMU: "load of migration failed"), in postcopy too."""


def check_device_state(state: dict, cfg: Config) -> dict:
    """The device state, checked against this destination's own configuration: a vCPU
    thread starts per position, so the source must not choose how many, or what they are."""
    vcpus, n = state.get("vcpus"), cfg["guest.vcpus"]
    if not (isinstance(vcpus, list) and len(vcpus) == n
            and all(type(p) is int and 0 <= p <= MAX_POS for p in vcpus)):
        shown = repr(vcpus)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise LoadError(f"device state: 'vcpus' must be the positions of the guest's {n} "
                        f"vCPU(s), integers from 0 to {MAX_POS}, got {shown}")
    return state


class LoadVM:
    """What the stream has said so far (the device state, POSTCOPY_ADVISE), and the threads
    that read it."""

    def __init__(self, dst: Destination) -> None:
        self.dst = dst
        self.device: dict = {}
        self.advised = False  # POSTCOPY_ADVISE came

    def read_channel(self, ep: Endpoint, which: int) -> None:
        """The listen thread (main) or the preempt thread: load messages until EOF, or until
        the channel breaks or what it says cannot be loaded."""
        dst = self.dst
        payload = dst.cfg["emulator.payload"]
        unconfirmed = which == MAIN  # until its first record, it may be a stranger's
        try:
            while True:
                msg = wire.decode_main(ep.recv(), payload)
                if unconfirmed:
                    if not dst.conns.confirm(ep):
                        return  # given up: MAIN_SETUP_TIMEOUT, or a newer main took over
                    unconfirmed = False
                    if not dst.all_channels(ep):
                        return
                    dst.try_recover(ep)
                dst.loading()
                if isinstance(msg, wire.RamRecord):
                    dst.placer.receive(which, msg)
                elif isinstance(msg, wire.Eof):
                    dst.end_of_stream(which)
                    return
                elif which != MAIN:
                    raise wire.ProtocolError("the preempt channel carries RAM only")
                elif isinstance(msg, wire.MultifdFlush):
                    if dst.multifd:  # multifd_recv_sync_main(): nothing to wait for without
                        dst.multifd.recv_sync_main()
                elif isinstance(msg, wire.DeviceState):
                    self.device = check_device_state(msg.state, dst.cfg)
                else:
                    self.process_command(msg, ep)
        except LoadError as err:
            dst.load_failed(str(err))
        except (ChannelError, wire.ProtocolError) as err:
            if unconfirmed:
                dst.conns.forget(ep)  # it never was a migration stream: nothing to fail
            elif dst.conns.channels[which] is ep:  # not a connection we already replaced
                dst.channel_failed(f"{ep.name} channel: {err}")

    def process_command(self, msg: wire.Command, main: Endpoint) -> None:
        """loadvm_process_command(): one MIG_CMD_* from the main channel `main`."""
        if TRACE_COMMAND.enabled:
            TRACE_COMMAND(com=wire.MIG_CMD_NAMES[msg.cmd], len=len(msg.data))
        dst = self.dst
        if msg.cmd == wire.MIG_CMD_POSTCOPY_ADVISE:
            self.advised = True
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RAM_DISCARD:
            if dst.placer.kernel is not None and dst.placer.postcopy:
                # as QEMU: a page dropped under registered RAM could be one a vCPU is writing
                raise LoadError(f"CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state "
                                f"({self.postcopy_state()})")
            size = dst.cfg.page_size
            for start, length in wire.parse_discard(msg.data):
                dst.placer.discard(start // size, length // size)
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_LISTEN:
            dst.postcopy_listen(main)
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RUN:
            if dst.vcpus or not dst.placer.postcopy:  # the guest starts here once
                raise LoadError(f"CMD_POSTCOPY_RUN in wrong postcopy state "
                                f"({self.postcopy_state()})")
            dst.start_vcpus(self.device)
        elif msg.cmd == wire.MIG_CMD_PING:
            dst.send_rp(wire.rp_message(wire.MIG_RP_MSG_PONG, msg.data))
        elif msg.cmd == wire.MIG_CMD_RECV_BITMAP:
            dst.send_rp(wire.recv_bitmap(dst.placer.states >= R.PRESENT))
        elif msg.cmd == wire.MIG_CMD_POSTCOPY_RESUME:
            dst.postcopy_resume(main)

    def postcopy_state(self) -> int:
        if self.dst.vcpus:
            return PS_RUNNING
        if self.dst.placer.postcopy:
            return PS_LISTENING
        return PS_ADVISE if self.advised else PS_NONE
