#!/bin/bash
# The lane's benchmark inside the guest (tests/kernel/bench runs it): wall
# time of moving the GPU pair and the xHCI to vfio-pci and back with
#   V  vfioctl bind/release (the client process included; vfiod verifies
#      every step),
#   A  the raw sysfs writes from this shell's builtins (the floor),
#   B  driverctl --nosave set-override/unset-override, one call per device,
#   C  virsh nodedev-detach --driver vfio / nodedev-reattach, one call per
#      device, with libvirtd started by hand,
# interleaved: each round runs every tool once per target, the order
# rotating from round to round; round 0 is a warm-up. Each move's result is
# checked after the timed window (udevadm settle, then the driver links).
# vfiod runs throughout, as on a host that has it, and follows the other
# tools' moves through its uevents. Results: /lane-out/results.txt
# ("RES tool target op round microseconds rc=N ok=0|1").
# Adapted from ../shared/lab/real-kernel/anchors/bench.sh.
set -u
LANE_DIR=$(cd "$(dirname "$0")/.." && pwd)
top=$(cd "$LANE_DIR/../.." && pwd)
out=${LANE_OUT:-/lane-out}
[ -f "$out/env" ] && . "$out/env"
ROUNDS=${ROUNDS:-10}
bin=$top/target/${BIN:-release}
# What `make` installs: the static vfioctl (the ordinary build if absent).
vfioctl=$bin/dist/vfioctl
[ -x "$vfioctl" ] || vfioctl=$bin/vfioctl
RES=$out/results.txt
: > "$RES"
GPU=0000:01:00.0 AUD=0000:01:00.1 XHCI=0000:02:00.0
log() { echo "NOTE: [bench] $*"; }
drv() { local l; l=$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null) && echo "${l##*/}" || echo none; }
mkfifo /run/nap.fifo; exec {NAP_FD}<> /run/nap.fifo
nap() { read -r -t "$1" -u "$NAP_FD" _; }

dmesg -n 1
mkdir -p /run/udev
/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --subsystem-match=pci --action=add; udevadm settle -t 60
for m in bochs snd_hda_intel xhci_pci; do [ -d "/sys/module/$m" ] || modprobe "$m"; done
# Every tool starts with vfio-pci loaded.
modprobe vfio-pci
udevadm settle -t 60

# vfiod on a private bus with the project's policy; libvirtd on the stock
# system bus.
mkdir -p /run/lane-bus /run/dbus
"$top/tests/private-bus" /run/lane-bus/socket > /run/lane-bus/bus.conf
dbus-daemon --config-file=/run/lane-bus/bus.conf --fork --print-address=1 > /run/lane-bus/address
read -r VFIOD_BUS < /run/lane-bus/address
dbus-daemon --system --fork
# Info level, as a host runs it, but for the service's debug events "move
# requested" and "move answered": they split vfioctl's time into the
# client's, the planning, the steps and the reply (PHASES). The log goes to
# the guest's tmpfs, as a host's goes to the journal: a line written
# straight to /lane-out is a round trip to the host over 9p.
DBUS_SYSTEM_BUS_ADDRESS=$VFIOD_BUS VFIOD_LOG=info,vfiod::service=debug "$bin/vfiod" --config "$LANE_DIR/vfiod.toml" --state-dir /run/vfiod \
  2> /tmp/vfiod.log &
for _ in $(seq 200); do DBUS_SYSTEM_BUS_ADDRESS=$VFIOD_BUS "$vfioctl" status > /dev/null 2>&1 && break; nap 0.05; done
mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /run/lvconf
cat > /run/lvconf/libvirtd.conf <<EOC
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
log_outputs = "3:file:/tmp/libvirtd.log"
EOC
t0=$EPOCHREALTIME
libvirtd -d -f /run/lvconf/libvirtd.conf -p /run/libvirtd.pid 2> /tmp/libvirtd.stderr
for _ in $(seq 300); do virsh -c qemu:///system version > /dev/null 2>&1 && break; sleep 1; done
log "libvirtd answering after $(echo "$EPOCHREALTIME - $t0" | bc) s"

us() { local t=${EPOCHREALTIME/./}; REPLY=$((10#$t)); }
t0=${EPOCHREALTIME/./}; for _ in $(seq 20); do /bin/true; done; us
echo "RES calib all true 0 $(( (REPLY - 10#$t0) / 20 )) rc=0 ok=1" >> "$RES"
t0=${EPOCHREALTIME/./}; for _ in $(seq 10); do "$vfioctl" --version > /dev/null; done; us
echo "RES calib all vfioctl-version 0 $(( (REPLY - 10#$t0) / 10 )) rc=0 ok=1" >> "$RES"

V_bind() { DBUS_SYSTEM_BUS_ADDRESS=$VFIOD_BUS "$vfioctl" bind "$1"; }
V_rel() { DBUS_SYSTEM_BUS_ADDRESS=$VFIOD_BUS "$vfioctl" release "$1"; }
A_bind() { shift; local d rc=0; for d; do
  echo vfio-pci > "/sys/bus/pci/devices/$d/driver_override" || rc=1
  [ -e "/sys/bus/pci/devices/$d/driver" ] && { echo "$d" > "/sys/bus/pci/devices/$d/driver/unbind" || rc=1; }
  echo "$d" > /sys/bus/pci/drivers_probe || rc=1; done; return $rc; }
A_rel() { shift; local d rc=0; for d; do
  echo > "/sys/bus/pci/devices/$d/driver_override" || rc=1
  [ -e "/sys/bus/pci/devices/$d/driver" ] && { echo "$d" > "/sys/bus/pci/devices/$d/driver/unbind" || rc=1; }
  echo "$d" > /sys/bus/pci/drivers_probe || rc=1; done; return $rc; }
B_bind() { shift; local d rc=0; for d; do driverctl --nosave set-override "$d" vfio-pci || rc=1; done; return $rc; }
B_rel() { shift; local d rc=0; for d; do driverctl --nosave unset-override "$d" || rc=1; done; return $rc; }
C_bind() { shift; local d rc=0; for d; do virsh nodedev-detach "pci_${d//[:.]/_}" --driver vfio > /dev/null || rc=1; done; return $rc; }
C_rel() { shift; local d rc=0; for d; do virsh nodedev-reattach "pci_${d//[:.]/_}" > /dev/null || rc=1; done; return $rc; }

host_drv() { case $1 in "$GPU") echo bochs-drm ;; "$AUD") echo snd_hda_intel ;; "$XHCI") echo xhci_hcd ;; esac; }
verify() { # bind|rel DEVS...
  local op=$1 d ok=1 want o
  shift
  for d; do
    if [ "$op" = bind ]; then want=vfio-pci; else want=$(host_drv "$d"); fi
    [ "$(drv "$d")" = "$want" ] || ok=0
    if [ "$op" = rel ]; then read -r o < "/sys/bus/pci/devices/$d/driver_override"; [ "$o" = "(null)" ] || ok=0; fi
  done
  echo $ok
}
timed() { # TOOL TARGET OP ROUND PROFILE DEVS...
  local tool=$1 tgt=$2 op=$3 r=$4
  shift 4
  local t0=${EPOCHREALTIME/./}
  "${tool}_${op}" "$@" > /tmp/op.out 2>&1
  local rc=$? t1=${EPOCHREALTIME/./}
  [ "$tool" = V ] && echo "$tgt $op $r $t0 $t1" >> "$out/vfioctl-times.txt"
  udevadm settle -t 60
  # The xHCI back on its driver: its USB disk comes back asynchronously,
  # and udevd opens it to probe it; every tool starts from a quiet machine.
  if [ "$tgt" = xhci ] && [ "$op" = rel ]; then
    for _ in $(seq 250); do [ -e /sys/class/block/sda ] && break; nap 0.02; done
    udevadm settle -t 60
  fi
  nap 0.5
  shift
  local ok; ok=$(verify "$op" "$@")
  echo "RES $tool $tgt $op $r $(( 10#$t1 - 10#$t0 )) rc=$rc ok=$ok" >> "$RES"
  if [ $rc -ne 0 ] || [ "$ok" -ne 1 ]; then
    log "$tool $tgt $op round $r: rc=$rc ok=$ok: $(head -c 300 /tmp/op.out | tr '\n' ' ') state GPU=$(drv $GPU) AUD=$(drv $AUD) XHCI=$(drv $XHCI)"
  fi
}
TOOLS=(V A B C)
for r in $(seq 0 "$ROUNDS"); do
  log "round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
  for k in 0 1 2 3; do
    t=${TOOLS[$(( (r + k) % 4 ))]}
    timed "$t" gpu bind "$r" gpu "$GPU" "$AUD"
    timed "$t" gpu rel "$r" gpu "$GPU" "$AUD"
  done
  for k in 0 1 2 3; do
    t=${TOOLS[$(( (r + k) % 4 ))]}
    timed "$t" xhci bind "$r" usb "$XHCI"
    timed "$t" xhci rel "$r" usb "$XHCI"
  done
done
cp /tmp/libvirtd.log /tmp/vfiod.log "$out/" 2>/dev/null
bad=$(grep -c 'ok=0\|rc=[1-9]' "$RES")
log "final state GPU=$(drv $GPU) AUD=$(drv $AUD) XHCI=$(drv $XHCI); $bad operations did not end as expected"
[ "$bad" -eq 0 ] && echo "PASS: [bench] every timed operation ended on the expected driver" \
  || echo "FAIL: [bench] $bad timed operations did not end on the expected driver (results.txt)"
exit 0
