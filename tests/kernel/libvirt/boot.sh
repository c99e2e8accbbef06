#!/bin/bash
# The libvirt lane's guest without systemd (tests/kernel/libvirt/run boots
# it with tests/kernel/boot): what a host's boot does before vfiod and
# libvirtd start, by hand, then checks.sh, which starts them as their units
# would. Under systemd as PID 1 checks.sh runs alone.
set -u
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../../.." && pwd)
out=${LANE_OUT:-/lane-out}
[ -f "$out/env" ] && { set -a; . "$out/env"; set +a; }
t0=${EPOCHREALTIME/./}
ms() { echo $(( (10#${EPOCHREALTIME/./} - 10#$t0) / 1000 )); }

# udev and the lane's devices on their drivers, as tests/kernel/guest/real.sh.
dmesg -n 1
mkdir -p /run/udev
/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --subsystem-match=pci --action=add
udevadm settle -t 60
for m in bochs snd_hda_intel xhci_pci; do [ -d "/sys/module/$m" ] || modprobe "$m"; done
for _ in $(seq 250); do
  [ -e /sys/class/block/sda ] && [ -e /sys/class/sound/controlC0 ] && break
  sleep 0.02
done
udevadm settle -t 60
echo "TIME: [libvirt] udev settled after $(ms) ms"

# vfiod as the README installs it: `make install` (the debug build the
# lane runs; tests/kernel/libvirt/run built it).
if ! make -s -C "$top" install PROFILE=debug > /run/make-install.log 2>&1; then
  echo "FAIL: [libvirt] make install PROFILE=debug: $(tail -5 /run/make-install.log)"
  exit 1
fi
# What systemd-modules-load does with the installed modules-load.d file.
grep -v '^#' /usr/lib/modules-load.d/vfio-pci.conf | while read -r m; do [ -n "$m" ] && modprobe "$m"; done
# The system bus, as dbus.service starts it (the installed policy in system.d).
mkdir -p /run/dbus
dbus-daemon --system --fork || { echo "FAIL: [libvirt] dbus-daemon --system did not start"; exit 1; }
echo "TIME: [libvirt] guest ready (udev settled, make install, system bus) after $(ms) ms"
exec bash "$here/checks.sh"
