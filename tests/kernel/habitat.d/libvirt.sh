#!/bin/bash
# The libvirt lane in the systemd lane's guest (tests/kernel/habitat runs
# every executable habitat.d/*.sh after its own checks): libvirtd as its
# systemd unit, vfiod as the installed unit, the hook as `make install`
# put it; tests/kernel/libvirt/checks.sh says what it checks.
exec bash "$(dirname "$0")/../libvirt/checks.sh"
