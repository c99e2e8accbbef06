#!/bin/bash
# What a VM start and stop cost with vfiod's hook (BENCHMARKS.md, "VM start
# with the hook"), in the systemd lane's guest: the same small TCG domain
# three ways, interleaved round by round:
#   vm-none     no hostdev (the floor: QEMU and libvirt alone);
#   vm-hook     the GPU pair as managed='no' hostdevs: vfiod's hook moves it;
#   vm-managed  the GPU pair as managed='yes': libvirt moves it itself.
# For each, `virsh start --paused` and `virsh destroy` until both functions
# are back on bochs-drm and snd_hda_intel with driver_override cleared.
# Prints BENCH: lines and the medians. Not part of the lanes' checks:
#   tests/kernel/bench-vm-start [ROUNDS]
set -u
here=$(cd "$(dirname "$0")" && pwd)
# BENCH_ROUNDS comes with the lane's env file (tests/kernel/bench-vm-start).
[ -f /lane-out/env ] && . /lane-out/env
ROUNDS=${BENCH_ROUNDS:-3}
WORK=/run/lane-bench
mkdir -p "$WORK"
LANE_KIND=bench
. "$here/guest-env.sh"

now_us() { REPLY=$((10#${EPOCHREALTIME/./})); }
home() { # the pair back on its host drivers, overrides cleared
  local a
  for a in "$GPU" "$AUD"; do
    k_driver "$a"; [ "$REPLY" = "${HOST_DRIVER[$a]}" ] || return 1
    k_override "$a"; [ -z "$REPLY" ] || return 1
  done
}
domain() { # NAME MANAGED|none
  local name=$1 managed=$2 a
  {
    echo "<domain type='qemu'><name>$name</name><memory unit='MiB'>64</memory>"
    echo "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
    echo "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
    echo "<controller type='usb' model='none'/><memballoon model='none'/>"
    if [ "$managed" != none ]; then
      for a in "$GPU" "$AUD"; do
        printf "<hostdev mode='subsystem' type='pci' managed='%s'><source><address domain='0x%s' bus='0x%s' slot='0x%s' function='0x%s'/></source></hostdev>\n" \
          "$managed" "${a:0:4}" "${a:5:2}" "${a:8:2}" "${a:11:1}"
      done
    fi
    echo "</devices></domain>"
  } > "$WORK/$name.xml"
  echo "define $WORK/$name.xml"
}

# No profile: the hook moves the managed='no' hostdevs, leaves the others.
mkdir -p /etc/vfiod
printf '[daemon]\nunbind_timeout_ms = 8000\n' > /etc/vfiod/vfiod.toml
systemctl restart vfiod libvirtd || { echo "FAIL: [bench] vfiod or libvirtd did not start"; exit 1; }
await_libvirt || { echo "FAIL: [bench] libvirtd does not answer"; exit 1; }
{ domain vm-none none; domain vm-hook no; domain vm-managed yes; } | "${VIRSH[@]}" > "$WORK/define.out" 2>&1

declare -A START DESTROY
failed=0
for round in $(seq "$ROUNDS"); do
  for d in vm-none vm-hook vm-managed; do
    now_us; t0=$REPLY
    if ! "${VIRSH[@]}" start --paused "$d" > "$WORK/start.out" 2>&1; then
      echo "FAIL: [bench] virsh start $d: $(tr '\n' ' ' < "$WORK/start.out")"; failed=1; continue
    fi
    now_us; start_ms=$(( (REPLY - t0) / 1000 ))
    now_us; t0=$REPLY
    "${VIRSH[@]}" destroy "$d" > "$WORK/destroy.out" 2>&1 || { echo "FAIL: [bench] virsh destroy $d"; failed=1; }
    if [ "$d" != vm-none ]; then
      for _ in $(seq 2000); do home && break; nap 0.01; done
    fi
    now_us; destroy_ms=$(( (REPLY - t0) / 1000 ))
    if [ "$d" != vm-none ] && ! home; then
      drivers_now
      echo "FAIL: [bench] $d: the pair is not back home 20 s after virsh destroy: $REPLY"
      failed=1 destroy_ms=lost
      # Home by hand, so that the next measurement starts where all do.
      vfioctl release --force "$GPU" > "$WORK/release.out" 2>&1 \
        || echo "FAIL: [bench] vfioctl release --force $GPU: $(tr '\n' ' ' < "$WORK/release.out")"
    fi
    START[$d]+="$start_ms " DESTROY[$d]+="$destroy_ms "
    # libvirt (9.0, virPCIDeviceDetach) keeps the first record of a device
    # in its list of inactive hostdevs: after a managed='no' domain that
    # record says libvirt did not bind it to vfio-pci, so a managed='yes'
    # domain later in the same libvirtd's life never gives the device back
    # (seen here: both functions left on vfio-pci, driver_override set).
    # A libvirtd restart, untimed, starts each vm-managed afresh.
    if [ "$d" = vm-hook ]; then
      systemctl restart libvirtd
      await_libvirt || { echo "FAIL: [bench] libvirtd does not answer after its restart"; failed=1; }
    fi
    echo "BENCH: round $round $d start ${start_ms} ms, destroy until home ${destroy_ms} ms"
  done
done
median() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
for d in vm-none vm-hook vm-managed; do
  echo "BENCH: $d median of $ROUNDS: start $(median "${START[$d]:-0}") ms, destroy until home $(median "${DESTROY[$d]:-0}") ms (start ${START[$d]:-}; destroy ${DESTROY[$d]:-})"
done
# Where the hook's time goes: vfiod's own moves, from its journal.
declare -A MOVES
while IFS= read -r line; do
  [[ $line == *'"VFIOD_ELAPSED_US":"'* && $line == *'"VFIOD_DIRECTION":"'* ]] || continue
  [[ $line =~ \"VFIOD_ELAPSED_US\":\"([0-9]+)\" ]] && us=${BASH_REMATCH[1]}
  [[ $line =~ \"VFIOD_DIRECTION\":\"([a-z]+)\" ]] && MOVES[${BASH_REMATCH[1]}]+="$((us / 1000)) "
done < <(journalctl -u vfiod -b -o json --no-pager)
for dir in bind release; do
  echo "BENCH: vfiod's $dir of the pair (its journal, move done): median $(median "${MOVES[$dir]:-0}") ms (${MOVES[$dir]:-none})"
done
# Every hand-back was healthy: vfiod said nothing else of any.
unhealthy=$(journalctl -u vfiod -b -p err -o cat --no-pager | grep -c "did not come back healthy")
[ "$unhealthy" = 0 ] || { echo "FAIL: [bench] vfiod judged $unhealthy hand-backs unhealthy"; failed=1; }
if [ $failed = 0 ]; then echo "PASS: [bench] $ROUNDS rounds of each"; else echo "FAIL: [bench] see above"; fi
exit $failed
