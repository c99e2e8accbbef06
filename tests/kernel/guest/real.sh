#!/bin/bash
# The lane inside the guest (tests/kernel/boot runs it as PID 1's child, as
# root, on the real kernel): systemd-udevd with a PCI coldplug, a private
# dbus-daemon with the project's policy, the real target/debug/vfiod on the
# real /sys, and tests/kernel/scenarios.sh through the real vfioctl.
# Without IOMMU groups (a boot with --no-iommu) it runs the NoIommu
# scenarios instead. Writes to /lane-out: snapshot.toml (vfioctl snapshot at
# boot), outcomes.txt, vfiod.log, dmesg.txt.
set -u
LANE_DIR=$(cd "$(dirname "$0")/.." && pwd)
top=$(cd "$LANE_DIR/../.." && pwd)
bin=$top/target/debug
out=${LANE_OUT:-/lane-out}
LANE_KIND=real
# The static vfioctl, as `make` installs it (tests/kernel/run builds it).
VFIOCTL=$bin/dist/vfioctl
WORK=/run/lane
OUTCOMES=$out/outcomes.txt
mkdir -p "$WORK"
# Settings from the host (tests/kernel/boot LANE_GUEST_ENV), e.g. LANE_ONLY.
[ -f "$out/env" ] && . "$out/env"
. "$LANE_DIR/scenarios.sh"
[ -d /sys/kernel/iommu_groups ] && [ -n "$(ls /sys/kernel/iommu_groups)" ] && iommu=1 || iommu=0
[ $iommu = 1 ] || LANE_KIND=real-noiommu
uptime_s() { local u; read -r u _ < /proc/uptime; REPLY=$u; }
uptime_s; t_start=$REPLY

# --- the backend: the real kernel ---
. "$LANE_DIR/guest/sysfs.sh"
K_USABLE_HOW="VFIO_GROUP_GET_STATUS, a type1v2 container, device fds, a DMA map"
k_usable() {
  "$bin/vfio-probe" group "$1" "$2" > "$WORK/probe.out" 2>&1
  local rc=$?
  REPLY=$(< "$WORK/probe.out")
  return $rc
}
k_hold() {
  "$bin/vfio-probe" hold "$1" > "$WORK/hold.out" 2>&1 & HOLD_PID=$!
  local i line=
  for i in $(seq 200); do
    read -r line < "$WORK/hold.out"
    [[ $line == holding* ]] && return 0
    kill -0 "$HOLD_PID" 2>/dev/null || break
    nap 0.02
  done
  note "the holder of $1 did not start: $(< "$WORK/hold.out")"
}
k_unhold() { kill "$HOLD_PID" 2>/dev/null; wait "$HOLD_PID" 2>/dev/null; }
k_follow() {
  "$bin/vfio-probe" follow "$@" > "$WORK/follow.out" 2>&1
  local rc=$? line
  REPLY=$(< "$WORK/follow.out")
  while IFS= read -r line; do LAST_LINE=$line; done <<< "$REPLY"
  return $rc
}
k_start_vfiod() {
  "$bin/vfiod" --config "$VFIOD_CONFIG" --state-dir /run/vfiod 2>> "$out/vfiod.log" &
  VFIOD_PID=$!
  await_vfiod 300 "vfiod did not come up on the bus (see vfiod.log)"
}
k_reload() { "$bin/vfiod" --reload "$VFIOD_PID" --state-dir /run/vfiod; }

# --- udev, the bus, vfiod ---
dmesg -n 1
mkdir -p /run/udev
/lib/systemd/systemd-udevd --daemon --resolve-names=never 2> "$WORK/udevd.err" \
  || fail "systemd-udevd did not start: $(< "$WORK/udevd.err")"
udevadm trigger --subsystem-match=pci --action=add
udevadm settle -t 60
for m in bochs snd_hda_intel xhci_pci; do [ -d "/sys/module/$m" ] || modprobe "$m"; done
# The USB disk on the xHCI card is scanned asynchronously, and so is the
# HDA codec behind the GPU's audio function (its card's nodes come after
# the driver binds): wait for their nodes, so that the snapshot is the
# same every time.
for i in $(seq 250); do
  [ -e /sys/class/block/sda ] && [ -e /sys/class/scsi_generic/sg0 ] \
    && [ -e /sys/class/sound/controlC0 ] && [ -e /sys/class/sound/hwC0D0 ] \
    && [ -e /sys/class/sound/pcmC0D0p ] && [ -e /sys/class/sound/pcmC0D0c ] && break
  nap 0.02
done
udevadm settle -t 60
uptime_s; t_udev=$REPLY
# The machine at boot, as a machine file (vfiod need not run for this).
"$VFIOCTL" snapshot > "$out/snapshot.toml" 2> "$out/snapshot.err" \
  || fail "vfioctl snapshot: $(< "$out/snapshot.err")"

mkdir -p /run/lane-bus
"$top/tests/private-bus" /run/lane-bus/socket > /run/lane-bus/bus.conf
dbus-daemon --config-file=/run/lane-bus/bus.conf --fork --print-address=1 > /run/lane-bus/address \
  || fail "dbus-daemon did not start"
read -r DBUS_SYSTEM_BUS_ADDRESS < /run/lane-bus/address
export DBUS_SYSTEM_BUS_ADDRESS
: > "$out/vfiod.log"
if k_start_vfiod; then
  uptime_s; t_vfiod=$REPLY
  echo "TIME: [$LANE_KIND] guest: script started at uptime ${t_start}s, udev settled ${t_udev}s, vfiod answering ${t_vfiod}s"
  if [ $iommu = 1 ]; then run_scenarios; else : > "$OUTCOMES"; : > "$OUTCOMES.doctor"; run_noiommu_scenarios; fi
  kill "$VFIOD_PID" 2>/dev/null; wait "$VFIOD_PID" 2>/dev/null
fi
dmesg > "$out/dmesg.txt"
uptime_s
summary "guest: scenarios done at uptime ${REPLY}s"
[ "$FAILS" -eq 0 ]
