#!/bin/bash
# The libvirt lane's checks, inside the real-kernel lane's guest, as root:
# a real libvirtd starts domains with `virsh` whose devices are
# `managed='no'` hostdevs, and vfiod's hook, installed by `make install`
# from systemd/ exactly as shipped, moves them over the default system bus
# (libvirt gives hooks only LC_ALL, PATH and HOME).
#
# Needs: vfiod, vfioctl and the hook installed (`make install`), the system
# bus on /run/dbus/system_bus_socket, libvirt-daemon-system and
# libvirt-clients. Under systemd (PID 1) vfiod and libvirtd are its units
# and this script uses systemctl; otherwise (tests/kernel/libvirt/boot.sh)
# it starts them by hand, as their units would.
#
# A nested QEMU start under TCG costs 20-40 s, so the checks share two
# domain lifetimes: vm-gpu with the xHCI bound at vfiod's start (boot =
# "vfio") and libvirtd restarted under it, and Nova's instance with vfiod
# SIGKILLed under it; the refusals start no QEMU.
# Prints one PASS:/FAIL: line per check with its time, and a count.
# Env: LANE_OUT (/lane-out): logs.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${LANE_OUT:-/lane-out}
WORK=/run/lane-libvirt
mkdir -p "$WORK"
LANE_KIND=libvirt
. "$here/guest-env.sh"
LPC=0000:00:1f.0 SATA=0000:00:1f.2 SMBUS=0000:00:1f.3
HOST_DRIVER+=(["$LPC"]=lpc_ich ["$SATA"]=ahci ["$SMBUS"]=i801_smbus)
LANE_DEVICES+=("$LPC" "$SATA" "$SMBUS")
# wait_for TRIES PAUSE CMD...: until CMD succeeds.
wait_for() {
  local tries=$1 pause=$2 i
  shift 2
  for i in $(seq "$tries"); do "$@" && return 0; nap "$pause"; done
  return 1
}
now_us() { REPLY=$((10#${EPOCHREALTIME/./})); }
# A check collects problems and the time of its steps, and ends with one
# line; the next check of the same lifetime begins there.
begin() { PROBLEMS=(); STEPS=(); now_us; T0=$REPLY; }
step_ms() { now_us; STEPS+=("$1 $(( (REPLY - $2) / 1000 )) ms"); }
verdict() {
  now_us
  local ms=$(( (REPLY - T0) / 1000 )) steps
  steps=$(IFS=,; echo "${STEPS[*]}")
  steps=${steps//,/, }
  if [ ${#PROBLEMS[@]} -eq 0 ]; then pass "$1 (${ms} ms${steps:+: $steps})"
  else local IFS=';'; fail "$1 (${ms} ms${steps:+: $steps}): ${PROBLEMS[*]}"; fi
  begin
}
# Back on its host driver with driver_override cleared, and its group's
# node gone.
want_home() {
  local a
  want_host "$@"
  want_cleared "$@"
  for a; do
    k_group "$a"
    [ ! -e "/dev/vfio/$REPLY" ] || problem "/dev/vfio/$REPLY is still there"
  done
}
# Every lane device back where the boot put it, whatever a failed check left.
all_home() {
  local a
  for a in "$GPU" "$AUD" "$XHCI"; do
    k_driver "$a"
    [ "$REPLY" = "${HOST_DRIVER[$a]}" ] && continue
    note "putting ${a#0000:} back on ${HOST_DRIVER[$a]} with vfioctl (it was on ${REPLY:-no driver})"
    vfioctl release --force "$a" > /dev/null 2>&1
  done
}

# --- the services: systemd's units, or by hand as the units run them ----
if [ -d /run/systemd/system ]; then SERVICES=systemd; else SERVICES=by-hand; fi
vfiod_pid() {
  REPLY=
  if [ $SERVICES = systemd ]; then
    REPLY=$(systemctl show -P MainPID vfiod); [ "$REPLY" = 0 ] && REPLY=
  else
    REPLY=${VFIOD_PID:-}
  fi
}
vfiod_answers() { vfioctl status > /dev/null 2>&1; }
# (Re)starts vfiod on the current config.
start_vfiod() {
  if [ $SERVICES = systemd ]; then
    systemctl restart vfiod || return 1
  else
    # The unit's ExecStart, as installed; its log in the guest's tmpfs (a
    # line to /lane-out is a 9p round trip).
    local exec
    exec=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/vfiod.service)
    $exec >> "$WORK/vfiod.log" 2>&1 &
    VFIOD_PID=$!
  fi
  wait_for 400 0.05 vfiod_answers
}
stop_vfiod() {
  if [ $SERVICES = systemd ]; then systemctl stop vfiod
  else kill "$VFIOD_PID" 2>/dev/null; wait "$VFIOD_PID" 2>/dev/null; fi
}
vfiod_replaced() { vfiod_pid; [ -n "$REPLY" ] && [ "$REPLY" != "$1" ]; }
# SIGKILL, then started again: systemd's Restart=on-failure, or by hand.
kill9_vfiod() {
  vfiod_pid; local old=$REPLY
  [ -n "$old" ] || { problem "vfiod is not running"; return 1; }
  if [ $SERVICES = systemd ]; then
    systemctl kill -s KILL vfiod
    wait_for 400 0.05 vfiod_replaced "$old" || { problem "systemd did not restart vfiod"; return 1; }
    wait_for 400 0.05 vfiod_answers || { problem "vfiod did not answer after its restart"; return 1; }
  else
    kill -9 "$old"; wait "$old" 2>/dev/null
    start_vfiod || { problem "vfiod did not answer after its restart"; return 1; }
  fi
}
# libvirt reads its hooks when it starts: (re)started after `make install`.
start_libvirtd() {
  if [ $SERVICES = systemd ]; then
    systemctl restart libvirtd || return 1
  else
    [ -n "$(pgrep -x virtlogd)" ] || virtlogd -d || return 1
    libvirtd -d -p /run/libvirtd.pid 2>> "$out/libvirtd.stderr" || return 1
  fi
  wait_for 600 0.1 libvirt_answers
}
process_gone() { ! kill -0 "$1" 2>/dev/null; }
restart_libvirtd() {
  if [ $SERVICES = systemd ]; then
    systemctl restart libvirtd || return 1
  else
    local pid=
    # libvirtd writes its pid without a newline.
    read -r pid < /run/libvirtd.pid || [ -n "$pid" ] || return 1
    kill "$pid"
    wait_for 200 0.05 process_gone "$pid" || return 1
    libvirtd -d -p /run/libvirtd.pid 2>> "$out/libvirtd.stderr" || return 1
  fi
  wait_for 600 0.1 libvirt_answers
}

# --- domains -----------------------------------------------------------
# hostdev ADDR: a managed='no' PCI hostdev, as an admin writes it.
hostdev() {
  local a=$1
  printf "    <hostdev mode='subsystem' type='pci' managed='no'>\n      <source><address domain='0x%s' bus='0x%s' slot='0x%s' function='0x%s'/></source>\n    </hostdev>\n" \
    "${a:0:4}" "${a:5:2}" "${a:8:2}" "${a:11:1}"
}
# domain_xml NAME ADDR...: a small TCG domain with those hostdevs.
domain_xml() {
  local name=$1 a
  shift
  {
    echo "<domain type='qemu'>"
    echo "  <name>$name</name>"
    echo "  <memory unit='MiB'>64</memory>"
    echo "  <os><type arch='x86_64' machine='q35'>hvm</type></os>"
    echo "  <devices>"
    echo "    <emulator>/usr/bin/qemu-system-x86_64</emulator>"
    echo "    <controller type='usb' model='none'/>"
    echo "    <memballoon model='none'/>"
    for a; do hostdev "$a"; done
    echo "  </devices>"
    echo "</domain>"
  } > "$WORK/$name.xml"
}
# Defines every domain in one virsh (each virsh costs seconds under TCG).
define_all() {
  domain_xml vm-gpu "$GPU" "$AUD" "$XHCI"
  domain_xml vm-thief "$GPU"
  domain_xml vm-bootvga "$HOSTVGA"
  domain_xml vm-ich9 "$SMBUS"
  domain_xml vm-vanished
  # Nova's instance directory and root disk (empty: the guest never runs).
  local dir=/var/lib/nova/instances/8a1f06d3-5c2e-4b7a-9e41-3d0c7f6b2a95
  mkdir -p "$dir" && truncate -s 1M "$dir/disk"
  cp "$here/nova-instance.xml" "$WORK/instance-0000002a.xml"
  local d
  for d in vm-gpu vm-thief vm-bootvga vm-ich9 vm-vanished instance-0000002a; do
    echo "define $WORK/$d.xml"
  done | "${VIRSH[@]}" > "$WORK/define.out" 2>&1
  local defined
  defined=$("${VIRSH[@]}" list --all --name | grep . | sort | tr '\n' ' ')
  [ "$defined" = "instance-0000002a vm-bootvga vm-gpu vm-ich9 vm-thief vm-vanished " ] ||
    { fail "virsh define: defined are $defined: $(tr '\n' ' ' < "$WORK/define.out")"; return 1; }
}
# start NAME: virsh start --paused; RC, MSG (virsh's output).
start() {
  now_us; local t0=$REPLY
  "${VIRSH[@]}" start --paused "$1" > "$WORK/start.out" 2>&1
  RC=$?
  step_ms "start $1" "$t0"
  MSG=$(tr '\n' ' ' < "$WORK/start.out")
}
want_started() {
  start "$1"
  [ "$RC" = 0 ] || { problem "virsh start $1 failed: $MSG"; return 1; }
}
# destroy NAME: returns when virsh does, and libvirt has run the hook's
# release end by then.
destroy() {
  now_us; local t0=$REPLY
  "${VIRSH[@]}" destroy "$1" > "$WORK/destroy.out" 2>&1 ||
    problem "virsh destroy $1: $(tr '\n' ' ' < "$WORK/destroy.out")"
  step_ms "destroy $1" "$t0"
}
# A refused start: virsh's error carries the hook's reason, with vfiod's
# error name, and nothing moved.
want_refused() { # NAME ERROR WORDS...
  local name=$1 err=$2 w before
  shift 2
  drivers_now; before=$REPLY
  start "$name"
  if [ "$RC" = 0 ]; then problem "virsh start $name succeeded"; destroy "$name"; return 1; fi
  [[ $MSG == *"vfioctl: $err: "* ]] || problem "virsh's error does not carry vfiod's $err: $MSG"
  for w; do [[ $MSG == *"$w"* ]] || problem "virsh's error does not name '$w': $MSG"; done
  drivers_now; [ "$REPLY" = "$before" ] || problem "drivers moved: $before -> $REPLY"
}
# The nested QEMU of a running domain holds each device's /dev/vfio node.
want_qemu_holds() { # NAME ADDR...
  local name=$1 pid fd l a found
  shift
  # libvirt starts it as "qemu-system-x86_64 -name guest=NAME,...".
  pid=$(pgrep -f "^/usr/bin/qemu-system-x86_64 -name guest=$name,") || { problem "no QEMU runs $name"; return 1; }
  for a; do
    k_group "$a"
    found=0
    for fd in /proc/"$pid"/fd/*; do
      l=$(readlink "$fd") || continue
      [ "$l" = "/dev/vfio/$REPLY" ] && { found=1; break; }
    done
    [ $found = 1 ] || problem "the QEMU of $name (pid $pid) does not hold /dev/vfio/$REPLY (${a#0000:})"
  done
}

# --- the checks --------------------------------------------------------
# vm-gpu takes the GPU pair and the xHCI, which profile usbboot (boot =
# "vfio") has had on vfio-pci since vfiod started; libvirtd is restarted
# under it before the destroy.
lifetime_vm_gpu() {
  begin
  want "$XHCI" vfio-pci
  want_started vm-gpu || { verdict "vm-gpu started"; return; }
  want_vfio "$GPU" "$AUD" "$XHCI"
  want_qemu_holds vm-gpu "$GPU" "$AUD" "$XHCI"
  verdict "virsh start of vm-gpu (the GPU pair and the xHCI as managed='no' hostdevs): the hook binds the pair, the nested QEMU holds /dev/vfio/N of both groups"
  want_refused vm-thief Conflict vm-gpu
  want_vfio "$GPU" "$AUD" "$XHCI"
  want_qemu_holds vm-gpu "$GPU" "$AUD"
  verdict "a second domain naming vm-gpu's GPU: virsh start fails with vfiod's Conflict naming vm-gpu, nothing moves, vm-gpu's QEMU keeps its groups"
  now_us; local t0=$REPLY
  restart_libvirtd || problem "libvirtd did not come back"
  step_ms "libvirtd restart" "$t0"
  "${VIRSH[@]}" domstate vm-gpu 2>&1 | grep -qx paused || problem "vm-gpu is not paused after the restart"
  want_qemu_holds vm-gpu "$GPU" "$AUD" "$XHCI"
  destroy vm-gpu
  want_home "$GPU" "$AUD"
  verdict "libvirtd restarted while vm-gpu runs, then virsh destroy: the GPU pair back on bochs-drm and snd_hda_intel, driver_override cleared, /dev/vfio/N gone"
  want "$XHCI" vfio-pci
  verdict "the xHCI, on vfio-pci since vfiod's start (boot = \"vfio\") and used by vm-gpu, stays there after the destroy (DESIGN §8)"
}

refusals() {
  begin
  want_refused vm-bootvga Protected 00:02.0
  verdict "a domain naming the host's boot VGA (console on it): virsh start fails with vfiod's Protected; nothing moves"
  # The ICH9 functions share group 6 with the LPC bridge on lpc_ich.
  want_refused vm-ich9 GroupNotViable 00:1f.0
  verdict "a domain naming 00:1f.3, whose group holds the LPC bridge on lpc_ich: virsh start fails with vfiod's GroupNotViable naming 00:1f.0; nothing moves"
  # Profile `vanishing` (vms = vm-vanished) names the GPU pair; the audio
  # function leaves the bus.
  echo 1 > "/sys/bus/pci/devices/$AUD/remove"
  wait_for 100 0.05 eval "[ ! -e /sys/bus/pci/devices/$AUD ]" || problem "01:00.1 did not leave the bus"
  want_refused vm-vanished UnknownTarget 01:00.1
  echo 1 > /sys/bus/pci/rescan
  audio_home() { k_driver "$AUD"; [ "$REPLY" = snd_hda_intel ]; }
  wait_for 200 0.05 audio_home || problem "01:00.1 did not come back on snd_hda_intel after the rescan"
  verdict "a domain whose profile names a device that left the bus: virsh start fails with vfiod's UnknownTarget naming it; the GPU stays on bochs-drm"
}

# A domain as OpenStack Nova (2025.1+) writes it for `[pci] device_spec`
# entries with "managed": "no" (nova-instance.xml).
lifetime_nova() {
  local name=instance-0000002a want
  begin
  want_started "$name" || { verdict "Nova's domain started"; return; }
  want_vfio "$GPU" "$AUD" "$XHCI"
  want_qemu_holds "$name" "$GPU" "$AUD" "$XHCI"
  "${VIRSH[@]}" dumpxml "$name" > "$WORK/nova-live.xml"
  for want in "<alias name='hostdev0'/>" "<alias name='hostdev1'/>" "<alias name='hostdev2'/>" "<driver name='vfio'/>"; do
    grep -qF "$want" "$WORK/nova-live.xml" || problem "the live XML lacks $want"
  done
  verdict "a domain as Nova writes it for [pci] device_spec with \"managed\": \"no\" (the GPU pair and the xHCI; libvirt adds hostdev0-2 and driver vfio): started through the hook, its QEMU holds both groups"
  now_us; local t0=$REPLY
  kill9_vfiod
  step_ms "vfiod SIGKILLed and answering again" "$t0"
  want_vfio "$GPU" "$AUD" "$XHCI"
  destroy "$name"
  want_home "$GPU" "$AUD" "$XHCI"
  verdict "vfiod SIGKILLed and started again while Nova's domain runs, then virsh destroy: the GPU pair and the xHCI back on bochs-drm, snd_hda_intel, xhci_hcd, driver_override cleared, /dev/vfio/N gone"
}

# --- the run -----------------------------------------------------------
write_config() { # EXTRA: the lane's /etc/vfiod/vfiod.toml
  mkdir -p /etc/vfiod
  {
    echo "[daemon]"
    echo "unbind_timeout_ms = 8000"
    echo "[profiles.vanishing]"
    echo "devices = [\"$GPU\", \"$AUD\"]"
    echo "vms = [\"vm-vanished\"]"
    echo "$1"
  } > /etc/vfiod/vfiod.toml
}

now_us; t_setup=$REPLY
[ -x /etc/libvirt/hooks/qemu.d/vfiod ] || fail "the hook is not installed at /etc/libvirt/hooks/qemu.d/vfiod"
# The config found here (the systemd lane's) comes back at the end.
[ -f /etc/vfiod/vfiod.toml ] && cp /etc/vfiod/vfiod.toml "$WORK/vfiod.toml.found"
# Profile usbboot first: vfiod binds it as it starts.
write_config $'[profiles.usbboot]\ndevices = ["0000:02:00.0"]\nboot = "vfio"'
if start_vfiod && start_libvirtd && define_all; then
  now_us
  echo "TIME: [libvirt] vfiod and libvirtd ($SERVICES) answering, domains defined, after $(( (REPLY - t_setup) / 1000 )) ms"
  lifetime_vm_gpu
  refusals
  # The rest without usbboot: vfiod started again, the xHCI given back.
  vfioctl release usbboot > "$WORK/release.out" 2>&1 || fail "vfioctl release usbboot: $(< "$WORK/release.out")"
  write_config ""
  stop_vfiod
  start_vfiod || fail "vfiod did not answer after its restart"
  all_home
  lifetime_nova
  all_home
else
  fail "vfiod or libvirtd did not start, or the domains were not defined (see $out)"
fi
for d in $("${VIRSH[@]}" list --name 2>/dev/null); do "${VIRSH[@]}" destroy "$d" > /dev/null 2>&1; done
if [ -f "$WORK/vfiod.toml.found" ]; then
  cp "$WORK/vfiod.toml.found" /etc/vfiod/vfiod.toml
  stop_vfiod
  start_vfiod || fail "vfiod did not answer on the config it was found with"
fi
cp /var/log/libvirt/qemu/*.log "$WORK"/vfiod.log "$WORK"/*-live.xml "$out/" 2>/dev/null
echo "LANE: [libvirt] $PASSES passed, $FAILS failed"
[ "$FAILS" -eq 0 ]
