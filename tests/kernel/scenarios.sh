# The lane's scenarios, sourced by guest/real.sh (the real kernel, inside the
# guest) and by sim.sh (the simulated kernel on machines/qemu-q35.toml): the
# same steps, the same checks, and one outcome line per step in $OUTCOMES
# (exit status, error name, every lane device's driver), which tests/kernel/run
# compares between the two.
#
# Each scenario prints one PASS:, FAIL: or XFAIL: line. Spawning a process
# costs 30-100 ms in the guest (TCG), so everything here is bash builtins
# except vfioctl and the backend's probes.
#
# The backend (real.sh or sim.sh) defines, before calling run_scenarios or
# run_noiommu_scenarios:
#   LANE_KIND            real | sim (shown on every line)
#   VFIOCTL WORK OUTCOMES   the client, a scratch dir, the outcome file
#   k_driver ADDR        REPLY = the bound driver as the kernel says, "" for none
#   k_override ADDR      REPLY = driver_override, "" when unset ("(null)")
#   k_group ADDR         REPLY = its IOMMU group
#   k_vfio_node GROUP    status 0 when /dev/vfio/GROUP exists
#   k_vfio_loaded        status 0 when vfio-pci is registered
#   k_usable GROUP ADDR  status 0: viable, container and device fd work;
#                        3: the kernel says not viable; REPLY = what it saw;
#                        K_USABLE_HOW says how it looks
#   k_node ADDR drm|snd  REPLY = the device's DRM card / ALSA control node
#   k_hold NODE          a process (comm vfio-probe) holds NODE; HOLD_PID
#   k_unhold             it lets go
#   k_follow ADDR DRIVER...  change the driver behind vfiod's back to each in
#                        turn; status 0 when vfiod's Device.Driver said so within
#                        100 ms (median per driver); REPLY = the timings, one per
#                        line, LAST_LINE = the verdict
#   k_start_vfiod        (re)starts vfiod and waits until it answers
#                        (await_vfiod); VFIOD_PID
#   k_put_back ADDR DRIVER   puts a device back on DRIVER by hand (cleanup)
#   k_fbcon              REPLY = bound | unbound: fbcon on the virtual terminals
#   k_fb ADDR            REPLY = the framebuffers drawing on ADDR, as /proc/fb
#                        names them ("" for none)
#   k_reload             vfiod --reload: SIGHUP and wait for vfiod's verdict
#
# vfiod reads $VFIOD_CONFIG, a copy of the lane's config that a scenario may
# change and reload, as an admin does.

HOSTVGA=0000:00:02.0 GPU=0000:01:00.0 AUD=0000:01:00.1 XHCI=0000:02:00.0
LANE_DEVICES=("$HOSTVGA" "$GPU" "$AUD" "$XHCI")
declare -A HOST_DRIVER=(["$HOSTVGA"]=bochs-drm ["$GPU"]=bochs-drm ["$AUD"]=snd_hda_intel ["$XHCI"]=xhci_hcd)
PASSES=0 FAILS=0 XFAILS=0
VFIOD_CONFIG=$WORK/vfiod.toml
LANE_CONFIG=$(< "$LANE_DIR/vfiod.toml")
printf '%s\n' "$LANE_CONFIG" > "$VFIOD_CONFIG"
PROBLEMS=()

pass() { echo "PASS: [$LANE_KIND] $*"; PASSES=$((PASSES + 1)); }
fail() { echo "FAIL: [$LANE_KIND] $*"; FAILS=$((FAILS + 1)); }
xfail() { echo "XFAIL: [$LANE_KIND] $*"; XFAILS=$((XFAILS + 1)); }
note() { echo "NOTE: [$LANE_KIND] $*"; }
# nap SECONDS: sleep without spawning a process (a read that times out).
mkfifo "$WORK/nap.fifo" 2>/dev/null
exec {NAP_FD}<> "$WORK/nap.fifo"
nap() { read -r -t "$1" -u "$NAP_FD" _; }
# await_vfiod TRIES WHAT: after a backend's k_start_vfiod has started vfiod
# (VFIOD_PID), waits until it answers on the bus; else fails with WHAT.
await_vfiod() {
  local i
  for i in $(seq "$1"); do
    "$VFIOCTL" status > /dev/null 2>&1 && return 0
    kill -0 "$VFIOD_PID" 2>/dev/null || break
    nap 0.05
  done
  fail "$2"
  return 1
}

# A scenario collects problems and ends with one verdict line.
begin() { PROBLEMS=(); SCENARIO_T0=${EPOCHREALTIME/./}; }
problem() { PROBLEMS+=("$*"); }
verdict() { # TEXT
  local t1=${EPOCHREALTIME/./} ms
  ms=$(( (10#$t1 - 10#$SCENARIO_T0) / 1000 ))
  if [ ${#PROBLEMS[@]} -eq 0 ]; then pass "$1 (${ms} ms)"
  else local IFS=';'; fail "$1: ${PROBLEMS[*]}"; fi
}

# ctl [--as USER] [--stdin FILE] ARGS...: vfioctl --json ARGS (as USER, with
# the user's groups, in one exec more). Sets RC, ERR (the error's short
# name, "-" on success), MSG (what vfioctl said on stderr), CTL_MS.
ctl() {
  local input=/dev/null as=()
  [ "$1" = --as ] && { as=(setpriv --reuid="$2" --regid="$2" --init-groups); shift 2; }
  [ "$1" = --stdin ] && { input=$2; shift 2; }
  local t0=${EPOCHREALTIME/./} t1 line
  "${as[@]}" "$VFIOCTL" --json "$@" < "$input" > "$WORK/ctl.out" 2> "$WORK/ctl.err"
  RC=$?
  t1=${EPOCHREALTIME/./}
  CTL_MS=$(( (10#$t1 - 10#$t0) / 1000 ))
  ERR=- MSG=
  while IFS= read -r line; do
    case "$line" in
      "vfioctl: warning: "*) ;;
      "vfioctl: "*) MSG+="${line#vfioctl: } " ;;
    esac
  done < "$WORK/ctl.err"
  if [ "$RC" -ne 0 ]; then
    local json
    json=$(< "$WORK/ctl.out")
    if [[ $json =~ \"name\":\"([^\"]*)\" ]]; then ERR=${BASH_REMATCH[1]##*.}
    elif [[ $MSG =~ ^([A-Za-z]+): ]]; then ERR=${BASH_REMATCH[1]}
    else ERR=exit$RC; fi
  fi
}

# Every lane device's driver, as the kernel says.
drivers_now() {
  local a s=
  for a in "${LANE_DEVICES[@]}"; do k_driver "$a"; s+=" ${a#0000:}=${REPLY:-none}"; done
  REPLY=${s# }
}

# outcome KEY [EXTRA]: one line for the comparison of real and simulated.
outcome() {
  drivers_now
  echo "$1 rc=$RC error=$ERR ${2:+$2 }$REPLY" >> "$OUTCOMES"
}

# want ADDR DRIVER: a problem unless the kernel says ADDR is on DRIVER ("" = none).
want() {
  k_driver "$1"
  [ "$REPLY" = "$2" ] || problem "${1#0000:} is on ${REPLY:-no driver}, not ${2:-no driver}"
}
want_host() { local a; for a; do want "$a" "${HOST_DRIVER[$a]}"; done; }
want_vfio() { local a; for a; do want "$a" vfio-pci; done; }
want_rc() { # RC ERR WHAT
  [ "$RC" = "$1" ] && [ "$ERR" = "$2" ] && return 0
  problem "$3: exit $RC ($ERR), expected exit $1 ($2)${MSG:+: $MSG}"
  return 1
}
want_cleared() {
  local a; for a; do k_override "$a"; [ -z "$REPLY" ] || problem "${a#0000:} keeps driver_override $REPLY"; done
}
want_said() { # TEXT...: vfioctl's message names each
  local t; for t; do [[ $MSG == *"$t"* ]] || problem "the message does not name '$t': $MSG"; done
}
group_usable() { # GROUP ADDR
  k_usable "$1" "$2"; local rc=$?
  [ $rc -eq 0 ] || problem "group $1 not usable as a VMM sees it (status $rc): $REPLY"
  return $rc
}
# Back to the boot state whatever a failed scenario left behind.
all_home() {
  local a
  for a in "$GPU" "$AUD" "$XHCI"; do
    k_driver "$a"
    if [ "$REPLY" != "${HOST_DRIVER[$a]}" ]; then
      note "putting ${a#0000:} back on ${HOST_DRIVER[$a]} by hand (it was on ${REPLY:-no driver})"
      k_put_back "$a" "${HOST_DRIVER[$a]}"
    fi
  done
}

scenario_gpu_bind_release() {
  local g
  k_group "$GPU"; g=$REPLY
  begin
  ctl bind gpu
  want_rc 0 - "vfioctl bind gpu" && want_vfio "$GPU" "$AUD"
  outcome gpu.bind
  k_vfio_node "$g" || problem "/dev/vfio/$g does not exist"
  group_usable "$g" "$GPU" && group_usable "$g" "$AUD"
  verdict "bind gpu: 01:00.0 and 01:00.1 on vfio-pci in ${CTL_MS} ms, group $g viable as the kernel sees it ($K_USABLE_HOW)"

  begin
  ctl release gpu
  want_rc 0 - "vfioctl release gpu" && want_host "$GPU" "$AUD"
  outcome gpu.release
  want_cleared "$GPU" "$AUD"
  ! k_vfio_node "$g" || problem "/dev/vfio/$g is still there"
  verdict "release gpu: bochs-drm and snd_hda_intel back in ${CTL_MS} ms, driver_override cleared, /dev/vfio/$g gone"
  all_home
}

scenario_usb_both_ways() {
  local g ms
  k_group "$XHCI"; g=$REPLY
  begin
  ctl bind usb
  want_rc 0 - "vfioctl bind usb" && want_vfio "$XHCI"
  outcome usb.bind
  ms=$CTL_MS
  group_usable "$g" "$XHCI"
  ctl release usb
  want_rc 0 - "vfioctl release usb" && want_host "$XHCI"
  outcome usb.release
  want_cleared "$XHCI"
  ! k_vfio_node "$g" || problem "/dev/vfio/$g is still there"
  verdict "the xHCI card (profile usb, by id) to vfio-pci in $ms ms, group $g usable, and back on xhci_hcd in ${CTL_MS} ms"
  all_home
}

scenario_boot_vga() {
  begin
  ctl bind 00:02.0
  want_rc 1 Protected "vfioctl bind 00:02.0"
  want_said 0000:00:02.0 console
  want_host "$HOSTVGA" "$GPU" "$AUD" "$XHCI"
  outcome bootvga.bind
  verdict "the boot VGA 00:02.0 with the console on it is refused (Protected) and nothing moves"
  all_home
}

# DESIGN §10 on a real kernel: the host's own boot VGA, fbcon on it (vtcon0,
# fb0), handed over to vfio-pci by a profile with handoff = true and given
# back. No display manager here (no systemd on the lane's bus): that step
# is skipped; no firmware framebuffer either (SeaBIOS).
scenario_handoff() {
  local fb off on
  begin
  k_fbcon; [ "$REPLY" = bound ] || problem "fbcon is $REPLY before the handoff"
  k_fb "$HOSTVGA"; fb=$REPLY
  [ -n "$fb" ] || problem "no framebuffer on ${HOSTVGA#0000:} before the handoff"
  ctl bind hostvga
  want_rc 0 - "vfioctl bind hostvga" && want_vfio "$HOSTVGA"
  k_fbcon; off=$REPLY
  [ "$off" = unbound ] || problem "fbcon is $off with 00:02.0 on vfio-pci"
  k_fb "$HOSTVGA"; [ -z "$REPLY" ] || problem "/proc/fb still lists $REPLY on 00:02.0"
  outcome handoff.bind "fbcon=$off"
  ctl release hostvga
  want_rc 0 - "vfioctl release hostvga" && want_host "$HOSTVGA"
  want_cleared "$HOSTVGA"
  k_fbcon; on=$REPLY
  [ "$on" = bound ] || problem "fbcon is $on after the release"
  k_fb "$HOSTVGA"; [ "$REPLY" = "$fb" ] || problem "/proc/fb lists '$REPLY' on 00:02.0 after the release, not '$fb'"
  outcome handoff.release "fbcon=$on"
  verdict "handoff: the boot VGA 00:02.0 (fbcon on it, /proc/fb: $fb) goes to vfio-pci with fbcon unbound and its framebuffer gone, and comes back on bochs-drm with fbcon bound and /proc/fb listing it again"
  all_home
}

scenario_function0() {
  local g
  k_group "$GPU"; g=$REPLY
  begin
  ctl bind 01:00.0
  want_rc 0 - "vfioctl bind 01:00.0" && want_vfio "$GPU" "$AUD"
  outcome fn0.bind
  group_usable "$g" "$GPU"
  ctl release 01:00.0
  want_rc 0 - "vfioctl release 01:00.0" && want_host "$GPU" "$AUD"
  outcome fn0.release
  verdict "bind 01:00.0 alone is completed with 01:00.1 (same slot, same group): group $g viable, never half; release 01:00.0 gives both back"
  all_home

  begin
  k_node "$AUD" snd; local node=$REPLY
  k_hold "$node"
  ctl bind 01:00.0
  want_rc 1 DeviceBusy "vfioctl bind 01:00.0 while $node is held"
  want_said 0000:01:00.1 vfio-probe "$node"
  want_host "$GPU" "$AUD"
  outcome fn0.refused
  k_unhold
  verdict "bind 01:00.0 while a process holds the audio function's $node is refused (DeviceBusy naming it) and 01:00.0 stays on bochs-drm"
  all_home
}

scenario_busy() {
  local g
  k_group "$GPU"; g=$REPLY
  begin
  k_node "$GPU" drm; local node=$REPLY
  k_hold "$node"
  ctl bind gpu
  want_rc 1 DeviceBusy "vfioctl bind gpu while $node is held"
  want_said 0000:01:00.0 vfio-probe "pid $HOLD_PID" "$node"
  want_host "$GPU" "$AUD"
  outcome busy.bind
  ctl bind gpu --force
  want_rc 0 - "vfioctl bind gpu --force" && want_vfio "$GPU" "$AUD"
  outcome busy.force
  group_usable "$g" "$GPU"
  k_unhold
  # A VM holding the group: vfio-pci's unbind would wait for it to let go.
  k_hold "/dev/vfio/$g"
  ctl release gpu
  want_rc 1 DeviceBusy "vfioctl release gpu while /dev/vfio/$g is held"
  want_said "group $g" vfio-probe "pid $HOLD_PID" "/dev/vfio/$g"
  want_vfio "$GPU" "$AUD"
  outcome busy.group_held
  k_unhold
  ctl release gpu
  want_rc 0 - "vfioctl release gpu" && want_host "$GPU" "$AUD"
  outcome busy.release
  verdict "a process holding $node: bind gpu is refused with DeviceBusy naming it (pid, comm, node), nothing moves; --force takes the pair; release is refused while a process holds /dev/vfio/$g"
  all_home
}

scenario_behind_back() {
  begin
  # Five times each way; the median of each must be within 100 ms.
  k_follow "$AUD" "" snd_hda_intel "" snd_hda_intel "" snd_hda_intel "" snd_hda_intel "" snd_hda_intel \
    || problem "$LAST_LINE"
  local line
  while IFS= read -r line; do note "behind vfiod's back: $line"; done <<< "$REPLY"
  RC=0 ERR=-; outcome behind.rebound
  verdict "01:00.1 unbound from and bound to snd_hda_intel behind vfiod's back (raw sysfs writes): its Device.Driver follows within 100 ms (median of 5 each way)"
  all_home
}

scenario_hook() {
  local xml=$LANE_DIR/lane-vm.xml owner
  begin
  ctl --stdin "$xml" libvirt-hook lane-vm prepare begin -
  want_rc 0 - "libvirt-hook lane-vm prepare begin" && want_vfio "$GPU" "$AUD"
  outcome hook.prepare
  ctl status 01:00.0
  owner=$(< "$WORK/ctl.out")
  [[ $owner == *'"owner":"lane-vm"'* ]] || problem "01:00.0's owner is not lane-vm: $owner"
  ctl --stdin "$xml" libvirt-hook lane-vm started begin -
  want_rc 0 - "libvirt-hook lane-vm started begin"
  sed 's/lane-vm/other-vm/' "$xml" > "$WORK/other-vm.xml"
  ctl --stdin "$WORK/other-vm.xml" libvirt-hook other-vm prepare begin -
  want_rc 1 Conflict "libvirt-hook other-vm prepare begin (devices owned by lane-vm)" && want_vfio "$GPU" "$AUD"
  outcome hook.conflict
  ctl --stdin "$xml" libvirt-hook lane-vm release end -
  want_rc 0 - "libvirt-hook lane-vm release end" && want_host "$GPU" "$AUD"
  outcome hook.release
  want_cleared "$GPU" "$AUD"
  verdict "libvirt hook: prepare/begin binds the managed='no' GPU pair for lane-vm (owner lane-vm), another domain gets Conflict, release/end gives both back"
  all_home
}

# vfiod killed with SIGKILL while a bind waits in the kernel: a process
# holds the audio function's ALSA control node, which makes snd_hda_intel's
# unbind wait until it is closed (snd_card_free waits for every open file).
scenario_sigkill() {
  begin
  local node i ctl_pid state
  k_node "$AUD" snd; node=$REPLY
  k_hold "$node"
  "$VFIOCTL" bind gpu --force > "$WORK/kill.out" 2>&1 & ctl_pid=$!
  # Wait until 01:00.0 is done and 01:00.1 has left snd_hda_intel: vfiod
  # is then in its unbind, which the kernel holds (the driver link goes
  # before the driver's remove runs). Not driver_override: reading it takes
  # the device lock, which the blocked unbind holds.
  for i in $(seq 400); do
    k_driver "$GPU"; local d0=$REPLY
    k_driver "$AUD"
    [ "$d0" = vfio-pci ] && [ "$REPLY" != snd_hda_intel ] && break
    nap 0.02
  done
  note "sigkill: waited $i rounds for the move to reach 01:00.1"
  nap 0.3
  drivers_now; state=$REPLY
  kill -KILL "$VFIOD_PID"
  # The holder lets go while vfiod dies: the kernel ends the unbind (and
  # only then can a real vfiod, blocked in it, exit).
  k_unhold
  wait "$VFIOD_PID" 2>/dev/null
  wait "$ctl_pid" 2>/dev/null; RC=$? ERR=killed
  outcome sigkill.killed
  note "vfiod killed with SIGKILL at: $state (vfioctl bind exited $RC)"
  k_start_vfiod || { problem "vfiod did not come back"; verdict "SIGKILL mid-move"; return; }
  # Give a recovery a moment to finish or undo the move.
  local ok=
  for i in $(seq 40); do
    k_driver "$GPU"; local d0=$REPLY; k_driver "$AUD"; local d1=$REPLY
    if [ -n "$d0" ] && [ -n "$d1" ] &&
       { [ "$d0/$d1" = vfio-pci/vfio-pci ] || [ "$d0/$d1" = "${HOST_DRIVER[$GPU]}/${HOST_DRIVER[$AUD]}" ]; }; then
      ok=1; break
    fi
    nap 0.05
  done
  RC=0 ERR=-; outcome sigkill.restarted
  drivers_now; state=$REPLY
  k_override "$AUD"; state+=" (01:00.1 driver_override ${REPLY:-(null)})"
  local what="vfiod SIGKILLed in the middle of bind gpu --force while a process holds $node, and restarted"
  if [ -n "$ok" ]; then
    pass "$what: the move was finished or undone, nothing driverless: $state"
  else
    fail "$what: left as $state"
  fi
  ctl release gpu
  note "after the restart, vfioctl release gpu: exit $RC ($ERR) $MSG"
  all_home
}

# The doctor's findings: those that follow from the PCI devices, the kernel
# and the machine's [host] facts (the CPU, /dev/kvm, ACPI tables, interrupt
# remapping, framebuffers, hugepages), which `vfioctl snapshot` writes, must
# agree between real and simulated. libvirt's come from the userland of
# whichever machine runs the lane (the guest reads its /etc/libvirt and its
# firmware files) and from what a machine file cannot say (the hook): those
# are shown, not compared (tests/kernel/run lists the differences). A
# finding whose fact nobody could read is "unknown", not "ok".
KERNEL_FINDINGS='^(cpu[.]|kvm|firmware[.]|iommu[.]|modules[.]|memory[.]|power[.]|groups|boot|reset|usb)'
scenario_check() { # KEY
  ctl check
  local findings=() kernel=() json chunk id sev
  json=$(< "$WORK/ctl.out")
  json=${json//'},{'/$'\n'}
  while IFS= read -r chunk; do
    id=? sev=?
    [[ $chunk =~ \"id\":\"([^\"]*)\" ]] && id=${BASH_REMATCH[1]}
    [[ $chunk =~ \"severity\":\"([^\"]*)\" ]] && sev=${BASH_REMATCH[1]}
    [[ $chunk == *'"message":"unknown: '* ]] && sev=unknown
    [ "$id$sev" = "??" ] && continue
    findings+=("$id:$sev")
    [[ $id =~ $KERNEL_FINDINGS ]] && kernel+=("$id:$sev")
  done <<< "$json"
  local IFS=, rc=$RC
  # Its exit status follows from every finding: not compared either.
  RC=- ERR=-
  outcome "$1" "findings=${kernel[*]:-none}"
  echo "$1 ${findings[*]:-none}" >> "$OUTCOMES.doctor"
  note "vfioctl check: exit $rc, findings ${findings[*]:-none}"
}

# k_kernel CALL ARG...: REPLY = the kernel's answer in words to one call of
# vfiod's own (vfio-probe kernel: the real sysfs, or the simulator's
# KernelCall), the same words on both.
k_kernel() {
  local sim=
  [ "$LANE_KIND" = sim ] && sim=--sim
  REPLY=$("$bin/vfio-probe" kernel $sim "$@" 2>&1)
}
want_kernel() { # ANSWER CALL ARG...: a problem unless the kernel answers ANSWER
  local want=$1
  shift
  k_kernel "$@"
  [ "$REPLY" = "$want" ] || problem "$* answered '$REPLY', not '$want'"
  echo "kernel $* -> $REPLY" >> "$OUTCOMES"
}

# DESIGN §10 on a real kernel: reset_method read, written and refused; a
# real reset; a remove and rescan that brings the same function back at the
# same address, unprobed with autoprobe off; vfiod's health check reading
# a real config space before it gives the function back.
scenario_health() {
  local bridge=0000:00:11.0 id=1b36:000d
  begin
  want_kernel bus reset-method "$GPU"
  want_kernel "no reset_method" reset-method "$AUD"
  want_kernel bus reset-method "$XHCI"
  want_kernel ok set-reset-method "$XHCI" bus
  want_kernel "errno 22" set-reset-method "$XHCI" flr
  want_kernel bus reset-method "$XHCI"
  if [ "$LANE_KIND" = real ]; then
    # What the health check costs per function (BENCHMARKS.md).
    local f
    for f in "$GPU" "$AUD" "$XHCI"; do note "$("$bin/vfio-probe" time-live-id "$f" 500 2>&1)"; done
  fi
  verdict "reset_method: read on the GPU pair and the xHCI; 'bus' written and read back; 'flr', which it lacks, refused (EINVAL) with nothing changed"

  begin
  ctl bind usb
  want_rc 0 - "vfioctl bind usb" && want_vfio "$XHCI"
  want_kernel "$id" live-id "$XHCI"
  want_kernel ok reset "$XHCI"
  want_kernel "$id" live-id "$XHCI"
  verdict "the xHCI on vfio-pci: a real reset, its config space answering with its ids before and after"

  begin
  ctl release usb
  want_rc 0 - "vfioctl release usb" && want_host "$XHCI"
  want_cleared "$XHCI"
  outcome health.release
  # The kernel probes what a rescan finds at once (pci_bus_add_device),
  # drivers_autoprobe or not: the same function back, on its own driver.
  want_kernel ok remove "$XHCI"
  want_kernel no present "$XHCI"
  want_kernel ok rescan "$bridge"
  want_kernel yes present "$XHCI"
  want_kernel "$id" live-id "$XHCI"
  want_host "$XHCI"
  want_cleared "$XHCI"
  outcome health.rescan
  verdict "vfiod's release read a real config space and gave the xHCI to xhci_hcd; a remove and a rescan of the bus behind 00:11.0 found it again at its address with its ids, on xhci_hcd at once"
  all_home
}

# DESIGN §10: a reset_method the kernel refuses for every function of a
# profile refuses its bind before anything moves, naming profile, device
# and value; the reload that brought it in is accepted (it is the kernel,
# not the file, that says no), and the function keeps its own methods.
scenario_reset_refused() {
  begin
  # [profiles.usb] is the last table of the lane's config.
  printf '%s\nreset_method = "flr"\n' "$LANE_CONFIG" > "$VFIOD_CONFIG"
  k_reload > "$WORK/reload.out" 2>&1 || problem "vfiod --reload: $(< "$WORK/reload.out")"
  want_kernel bus reset-method "$XHCI"
  # The reload's error names the device as an address (the journal's VFIOD_DEVICE).
  [[ $(< "$out/vfiod.log") == *"reset_method not set; binds of this profile will be refused device=$XHCI step="* ]] \
    || problem "vfiod's log does not name device=$XHCI where the reload failed to set reset_method"
  ctl bind usb
  want_rc 1 Kernel "vfioctl bind usb with reset_method = \"flr\"" \
    && want_said usb "$XHCI" '"flr"' "nothing was moved"
  outcome reset_refused.bind
  want_host "$XHCI"
  want_cleared "$XHCI"
  want_kernel bus reset-method "$XHCI"
  printf '%s\n' "$LANE_CONFIG" > "$VFIOD_CONFIG"
  k_reload > "$WORK/reload.out" 2>&1 || problem "vfiod --reload (back): $(< "$WORK/reload.out")"
  ctl bind usb
  want_rc 0 - "vfioctl bind usb after the reload back" && want_vfio "$XHCI"
  ctl release usb
  want_rc 0 - "vfioctl release usb" && want_host "$XHCI"
  verdict "a profile's reset_method the kernel refuses ('flr' on the xHCI, which has 'bus'): the reload is accepted, the bind refused naming profile, device and value, nothing moved; the old config back, the bind works"
  all_home
}

all_driverless_check() {
  begin
  local a
  for a in "${LANE_DEVICES[@]}"; do want "$a" "${HOST_DRIVER[$a]}"; want_cleared "$a"; done
  drivers_now
  verdict "after every scenario each lane device is on its host driver with driver_override cleared: $REPLY"
}

# LANE_ONLY="busy hook ..." runs only those, in that order (for debugging;
# a scenario_NAME function defined in the guest's env file runs too).
LANE_SCENARIOS=(gpu_bind_release usb_both_ways boot_vga handoff function0 busy behind_back hook sigkill health reset_refused)
run_scenarios() {
  : > "$OUTCOMES"; : > "$OUTCOMES.doctor"
  scenario_check check.iommu
  local s
  for s in ${LANE_ONLY:-${LANE_SCENARIOS[*]}}; do "scenario_$s"; done
  all_driverless_check
}

run_noiommu_scenarios() {
  begin
  scenario_check check.noiommu
  ctl bind gpu
  want_rc 1 NoIommu "vfioctl bind gpu"
  want_said "IOMMU"
  outcome noiommu.gpu
  ctl bind usb
  want_rc 1 NoIommu "vfioctl bind usb"
  outcome noiommu.usb
  want_host "$HOSTVGA" "$GPU" "$AUD" "$XHCI"
  want_cleared "$GPU" "$AUD" "$XHCI"
  ! k_vfio_loaded || problem "vfio-pci was loaded"
  verdict "without an IOMMU: bind gpu and bind usb are refused with NoIommu, nothing moves, vfio-pci is not even loaded"
}

summary() {
  echo "TIME: [$LANE_KIND] $*"
  echo "LANE: [$LANE_KIND] $PASSES passed, $FAILS failed, $XFAILS xfail"
}
