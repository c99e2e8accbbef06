#!/usr/bin/python3
"""Give a device (or a profile) to a VM and take it back, over the system bus.

    vfiod-dbus.py TARGET [--vm NAME]

Calls org.vfiod1.Manager.Bind, prints each Transition* signal as it arrives
and the state of the devices moved, then Release. TARGET is a profile name
or a PCI address. Uses python3-dbus with the GLib main loop (Debian:
apt-get install python3-dbus python3-gi); DBUS_SYSTEM_BUS_ADDRESS is
honoured. Exit status: 0 done, 1 refused or failed, 2 usage.
"""

import argparse
import sys

import dbus
import dbus.mainloop.glib
from gi.repository import GLib

NAME = "org.vfiod1"
MANAGER_PATH = "/org/vfiod1"
MANAGER = "org.vfiod1.Manager"
DEVICE = "org.vfiod1.Device"
# A move waits for the kernel: up to unbind_timeout_ms per write.
MOVE_TIMEOUT_S = 300


def on_signal(*args, member=None):
    if member == "TransitionStarted":
        target, direction = args
        print(f"started {target} {direction}", flush=True)
    elif member == "TransitionProgress":
        target, device, step = args
        print(f"progress {target} {device}: {step}", flush=True)
    elif member == "TransitionFinished":
        target, direction, error = args
        print(f"finished {target} {direction}: {error or 'ok'}", flush=True)


class Session:
    """Bind, show, release: one step per reply, the main loop in between
    so that signals print while a move runs."""

    def __init__(self, bus, target, options):
        self.bus = bus
        self.manager = dbus.Interface(bus.get_object(NAME, MANAGER_PATH), MANAGER)
        self.target = target
        self.options = options
        self.loop = GLib.MainLoop()
        self.status = 0

    def run(self):
        self.manager.Bind(
            self.target,
            self.options,
            reply_handler=self.bound,
            error_handler=self.failed,
            timeout=MOVE_TIMEOUT_S,
        )
        self.loop.run()
        return self.status

    def bound(self, paths):
        print(f"bound: {len(paths)} device(s)", flush=True)
        for path in paths:
            props = dbus.Interface(
                self.bus.get_object(NAME, path), dbus.PROPERTIES_IFACE
            ).GetAll(DEVICE)
            owner = props["Owner"] or "-"
            print(
                f"  {props['Address']}  driver={props['Driver']}"
                f"  state={props['State']}  owner={owner}",
                flush=True,
            )
        self.manager.Release(
            self.target,
            self.options,
            reply_handler=self.released,
            error_handler=self.failed,
            timeout=MOVE_TIMEOUT_S,
        )

    def released(self, _paths):
        print(f"released: {self.target}", flush=True)
        self.loop.quit()

    def failed(self, error):
        print(f"{error.get_dbus_name()}: {error.get_dbus_message()}", file=sys.stderr)
        self.status = 1
        self.loop.quit()


def main():
    parser = argparse.ArgumentParser(
        description="Bind TARGET to vfio-pci through vfiod, then release it."
    )
    parser.add_argument("target", help="a profile name or a PCI address")
    parser.add_argument("--vm", help="the VM that owns the devices meanwhile")
    args = parser.parse_args()

    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    try:
        bus = dbus.SystemBus()
        bus.add_signal_receiver(
            on_signal,
            dbus_interface=MANAGER,
            bus_name=NAME,
            path=MANAGER_PATH,
            member_keyword="member",
        )
        options = dbus.Dictionary(signature="sv")
        if args.vm:
            options["vm"] = dbus.String(args.vm)
        return Session(bus, args.target, options).run()
    except dbus.exceptions.DBusException as error:
        print(f"{error.get_dbus_name()}: {error.get_dbus_message()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
