#!/bin/bash
# The lane's scenarios on the simulated kernel, on this machine, no root
# needed: a private bus, vfiod --machine machines/qemu-q35.toml (the lane's
# guest as `vfioctl snapshot` wrote it), then the NoIommu scenarios on the
# same machine without its IOMMU. What the guest does with raw sysfs writes,
# open files and VFIO ioctls, this does through the simulator's control
# interface (org.vfiod1.Simulator).
#   tests/kernel/sim.sh [OUTDIR]     (default target/kernel-lane/sim)
# Writes OUTDIR/outcomes.txt, OUTDIR/outcomes-noiommu.txt, OUTDIR/vfiod.log;
# exit 0 when every scenario passed. Uses the binaries in target/debug
# (tests/kernel/run builds them).
set -u
LANE_DIR=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$LANE_DIR/../.." && pwd)
bin=$top/target/debug
out=${1:-$top/target/kernel-lane/sim}
machine=$top/machines/qemu-q35.toml
mkdir -p "$out"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vfiod-lane-sim.XXXXXX")
LANE_KIND=sim
VFIOCTL=$bin/vfioctl
. "$LANE_DIR/scenarios.sh"
BUS_PID= VFIOD_PID= HOLD_PID=
cleanup() {
  local p
  for p in $VFIOD_PID $BUS_PID $HOLD_PID; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- the backend: the simulated kernel. What it says is in its state file
# (vfiod writes it after every change), read here without asking vfiod. ---
state_field() { # ADDR FIELD -> REPLY (JSON null -> "")
  local line found=
  REPLY=
  while IFS= read -r line; do
    case "$line" in
      *"\"$1\": {"*) found=1 ;;
      *"\"$2\": "*)
        if [ -n "$found" ]; then
          line=${line#*\": }; line=${line%,}
          [ "$line" = null ] || { line=${line#\"}; REPLY=${line%\"}; }
          return 0
        fi ;;
    esac
  done < "$STATE_DIR/sim-state.json"
}
k_driver() { state_field "$1" driver; }
k_override() { state_field "$1" driver_override; }
machine_field() { # ADDR KEY -> REPLY: KEY's raw value in the device's [[device]] table
  local line found=
  REPLY=
  while IFS= read -r line; do
    case "$line" in
      "[[device]]") [ -n "$found" ] && return 1 ;;
      "address = \"$1\"") found=1 ;;
      "$2 = "*) [ -n "$found" ] && { REPLY=${line#"$2 = "}; return 0; } ;;
    esac
  done < "$MACHINE"
  return 1
}
k_group() { machine_field "$1" group; }
k_vfio_node() {
  local a
  for a in "${LANE_DEVICES[@]}"; do
    k_group "$a"; [ "$REPLY" = "$1" ] || continue
    k_driver "$a"; [ "$REPLY" = vfio-pci ] && return 0
  done
  return 1
}
k_vfio_loaded() {
  local line
  while IFS= read -r line; do [[ $line == *'"vfio_pci"'* ]] && return 0; done < "$STATE_DIR/sim-state.json"
  return 1
}
sim_call() { busctl --system call org.vfiod1 /org/vfiod1/simulator org.vfiod1.Simulator "$@"; }
K_USABLE_HOW="the simulator's GroupViable, what VFIO_GROUP_GET_STATUS would say"
k_usable() {
  REPLY=$(sim_call GroupViable u "$1" 2>&1)
  [ "$REPLY" = "b true" ] && return 0
  [ "$REPLY" = "b false" ] && return 3
  return 1
}
k_node() { # ADDR drm|snd: from the machine file's nodes
  local pattern node
  case $2 in drm) pattern=/dev/dri/card ;; snd) pattern=/dev/snd/controlC ;; esac
  REPLY=
  machine_field "$1" nodes || return 1
  for node in ${REPLY//[\[\],\"]/ }; do
    [[ $node == "$pattern"* ]] && { REPLY=$node; return 0; }
  done
  REPLY=
}
k_hold() {
  sleep 1000 & HOLD_PID=$!
  sim_call AddHolder uss "$HOLD_PID" vfio-probe "$1" > /dev/null || note "AddHolder $1 failed"
}
# A killed vfiod is gone (a zombie or reaped) within 5 s: nothing but
# vfio-probe sim-unhold writes the simulated kernel's state then.
vfiod_gone() {
  local stat
  for _ in $(seq 100); do
    read -r stat 2>/dev/null < "/proc/$VFIOD_PID/stat" || return 0
    stat=${stat##*) }; [ "${stat%% *}" = Z ] && return 0
    nap 0.05
  done
  return 1
}
k_unhold() {
  # With vfiod down (killed), the simulated kernel's own control surface on
  # its state file: the holder lets go, and an unbind it held up ends, as on
  # a real kernel whose holder exits while vfiod is dead.
  if ! sim_call RemoveHolder u "$HOLD_PID" > /dev/null 2>&1; then
    vfiod_gone || note "vfiod $VFIOD_PID still runs and did not answer RemoveHolder"
    "$bin/vfio-probe" sim-unhold "$MACHINE" "$STATE_DIR" "$HOLD_PID" > /dev/null ||
      note "the simulated kernel's holder $HOLD_PID could not let go"
  fi
  kill "$HOLD_PID" 2>/dev/null; wait "$HOLD_PID" 2>/dev/null; HOLD_PID=
}
k_follow() {
  REPLY=$("$bin/vfio-probe" follow --sim "$@" 2>&1)
  local rc=$? line
  while IFS= read -r line; do LAST_LINE=$line; done <<< "$REPLY"
  return $rc
}
k_start_vfiod() {
  "$bin/vfiod" --machine "$MACHINE" --config "$VFIOD_CONFIG" --state-dir "$STATE_DIR" \
    2>> "$out/vfiod.log" &
  VFIOD_PID=$!
  await_vfiod 200 "vfiod --machine $MACHINE did not come up on the bus (see $out/vfiod.log)"
}
k_reload() { "$bin/vfiod" --reload "$VFIOD_PID" --state-dir "$STATE_DIR"; }
k_put_back() { sim_call SetDriver ss "$1" "$2" > /dev/null; }
# The machine boots with fbcon bound on vtcon0 ([display]); the state file
# holds what changed since.
k_fbcon() {
  local line
  REPLY=bound
  while IFS= read -r line; do [[ $line == *'"vtcon0": false'* ]] && REPLY=unbound; done < "$STATE_DIR/sim-state.json"
}
# A DRM driver's framebuffer: there while the function is on bochs-drm.
k_fb() {
  k_driver "$1"
  if [ "$REPLY" = bochs-drm ]; then REPLY=bochs-drmdrmfb; else REPLY=; fi
}
stop_vfiod() { kill "$VFIOD_PID" 2>/dev/null; wait "$VFIOD_PID" 2>/dev/null; VFIOD_PID=; }

# --- the bus ---
"$top/tests/private-bus" "$WORK/bus" "$(id -un)" > "$WORK/bus.conf"
dbus-daemon --config-file="$WORK/bus.conf" --nofork --print-address=1 > "$WORK/address" 2> "$WORK/bus.log" &
BUS_PID=$!
for _ in $(seq 100); do [ -s "$WORK/address" ] && break; nap 0.05; done
read -r DBUS_SYSTEM_BUS_ADDRESS < "$WORK/address"
export DBUS_SYSTEM_BUS_ADDRESS
: > "$out/vfiod.log"
t0=${EPOCHREALTIME/./}

# --- the machine as the guest booted it ---
MACHINE=$machine STATE_DIR=$WORK/state OUTCOMES=$out/outcomes.txt
k_start_vfiod && run_scenarios
stop_vfiod

# --- the same machine booted without its IOMMU: no groups, intel_iommu off ---
LANE_KIND=sim-noiommu
MACHINE=$WORK/qemu-q35-noiommu.toml STATE_DIR=$WORK/state-noiommu OUTCOMES=$out/outcomes-noiommu.txt
sed -f "$LANE_DIR/noiommu.sed" "$machine" > "$MACHINE"
: > "$OUTCOMES"; : > "$OUTCOMES.doctor"
k_start_vfiod && run_noiommu_scenarios
stop_vfiod
t1=${EPOCHREALTIME/./}
LANE_KIND=sim
PASSES=$PASSES FAILS=$FAILS
summary "simulated lane took $(( (10#$t1 - 10#$t0) / 1000 )) ms"
[ "$FAILS" -eq 0 ]
