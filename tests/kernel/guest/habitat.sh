#!/bin/bash
# The systemd lane inside the guest (tests/kernel/habitat): vfiod as its
# users run it. guest/init's lane.mode=systemd runs this from
# lane-script.service after multi-user.target, as root, with systemd 252 as
# PID 1, its journald, dbus-daemon and polkitd, on an overlay whose upper
# layer (an ext4 disk) survives the guest's reboot. Two boots:
#   1. vfiod installed as the README says (make install, modprobe,
#      systemctl enable --now) and checked as root and as two users, one
#      in group vfio with the shipped polkit rule (alice), one not (bob);
#      then boot = "vfio" through systemctl reload (the early claim's udev
#      rule and initramfs-tools hook written), and systemctl reboot;
#   2. the overlay kept it all; bochs loaded by the coldplug before vfiod
#      started, and the rule kept the GPU pair off it (vfio-pci at add);
#      the profile removed, the rule goes; then every executable
#      tests/kernel/habitat.d/*.sh (or $HABITAT_EXTRA), see run_extras.
# One PASS:/FAIL: line per check on the console (tests/kernel/habitat counts
# them); logs in /lane-out. A process costs 30-100 ms here (TCG): few of
# them, and bash builtins for the rest.
set -u
LANE_DIR=$(cd "$(dirname "$0")/.." && pwd)
top=$(cd "$LANE_DIR/../.." && pwd)
out=${LANE_OUT:-/lane-out}
LANE_KIND=habitat
WORK=/run/lane
OUTCOMES=/dev/null
mkdir -p "$WORK"
# Settings from the host (LANE_GUEST_ENV), exported for the extra scripts.
set -a
[ -f "$out/env" ] && . "$out/env"
set +a
. "$LANE_DIR/scenarios.sh"
. "$LANE_DIR/guest/sysfs.sh"
VFIOCTL=/usr/bin/vfioctl
CONFIG=/etc/vfiod/vfiod.toml
# On the overlay's disk: what the first boot left for the second.
STATE=/var/lib/lane-habitat
IN_GROUP=alice OUTSIDER=bob
mkdir -p "$STATE"
uptime_s() { local u; read -r u _ < /proc/uptime; REPLY=$u; }
uptime_s; t_start=$REPLY

# unit_show PROPS: REPLY = `systemctl show vfiod -p PROPS` as "K=V K=V".
unit_show() {
  local line s=
  while IFS= read -r line; do s+="$line "; done < <(systemctl show vfiod -p "$1" 2>&1)
  REPLY=${s% }
}
# field NAME TEXT: REPLY = NAME's value in a line of `K=V` or JSON.
field() {
  REPLY=
  if [[ ${2//$'\n'/ } =~ (^|[ ,{])\"?$1\"?[=:]\"?([^\" ,}]*) ]]; then REPLY=${BASH_REMATCH[2]}; fi
}
# journal_json ARGS...: `journalctl -o json ARGS` into $WORK/journal.json.
journal_json() { journalctl --no-pager -o json "$@" > "$WORK/journal.json" 2>&1; }
# The README's commands under a heading: the first ```sh block after the
# line HEADING, continuation lines joined, comments and "sudo " dropped.
readme_commands() {
  local line in= cmd= seen=
  README_COMMANDS=()
  while IFS= read -r line; do
    if [ -z "$seen" ]; then [ "$line" = "$1" ] && seen=1; continue; fi
    if [ -z "$in" ]; then [ "$line" = '```sh' ] && in=1; continue; fi
    [ "$line" = '```' ] && break
    line=${line%%  #*}
    [ -n "$cmd" ] && line=${line#"${line%%[![:space:]]*}"}
    cmd+="${line%\\}"
    [[ $line == *\\ ]] && continue
    cmd=${cmd#sudo }
    README_COMMANDS+=("${cmd%"${cmd##*[![:space:]]}"}")
    cmd=
  done < "$top/README.md"
}
# run_readme HEADING SKIP_REGEX: runs those commands in $top (USER=alice
# for "$USER"), each logged to /lane-out/readme.log; REPLY = what ran.
run_readme() {
  local c ran= rc
  readme_commands "$1"
  [ ${#README_COMMANDS[@]} -gt 0 ] || problem "README.md has no sh block under '$1'"
  for c in "${README_COMMANDS[@]}"; do
    if [[ $c =~ $2 ]]; then note "not run here: '$c' (${BASH_REMATCH[0]})"; continue; fi
    # The build the host made (tests/kernel/habitat: HABITAT_MAKE_ARGS).
    [ "$c" = "make install" ] && c+="${HABITAT_MAKE_ARGS:+ $HABITAT_MAKE_ARGS}"
    echo "# $c" >> "$out/readme.log"
    (cd "$top" && USER=$IN_GROUP && eval "$c") >> "$out/readme.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || problem "'$c' exited $rc (readme.log: $(tail -3 "$out/readme.log" | tr '\n' ' '))"
    ran+="'$c', "
  done
  REPLY=${ran%, }
}
# bound_ok ADDR...: on vfio-pci, their group's /dev/vfio node there.
bound_ok() {
  local a
  want_vfio "$@"
  for a; do k_group "$a"; k_vfio_node "$REPLY" || problem "no /dev/vfio/$REPLY for ${a#0000:}"; done
}
# home_ok ADDR...: on their host drivers, driver_override cleared.
home_ok() { want_host "$@"; want_cleared "$@"; }
write_config() { # BOOT ("host"|"vfio") EXTRA_PROFILE_TOML
  cat > "$CONFIG" <<EOF
# The systemd lane's config (tests/kernel/guest/habitat.sh).
[daemon]
unbind_timeout_ms = 3000

[profiles.gpu]
devices = ["0000:01:00.0", "0000:01:00.1"]
boot = "$1"

[profiles.usb]
ids = ["1b36:000d"]
$2
EOF
}

# --- boot 1 -----------------------------------------------------------

check_boot() {
  begin
  local v failed
  v=$(systemctl show -p Version -p NFailedUnits -p SystemState 2>&1)
  field Version "$v"; local version=$REPLY
  field NFailedUnits "$v"; failed=$REPLY
  read -r comm < /proc/1/comm
  [ "$comm" = systemd ] || problem "PID 1 is $comm"
  [ "$failed" = 0 ] || problem "$failed units failed: $(systemctl list-units --failed --plain --no-legend | tr '\n' ' ')"
  verdict "boot $1: systemd $version is PID 1, multi-user.target reached at uptime ${t_start}s, no unit failed"
}

install_as_readme_says() {
  begin
  mkdir -p /etc/vfiod
  write_config host ""
  : > "$out/readme.log"
  # `make` is the host's (tests/kernel/habitat builds); libvirtd is the
  # libvirt lane's.
  run_readme "## Install" '^make$|libvirtd'
  local ran=$REPLY
  unit_show ActiveState,UnitFileState,FragmentPath,ExecMainPID
  local state=$REPLY
  [[ $state == *ActiveState=active* ]] || problem "vfiod is not active: $state"
  [[ $state == *UnitFileState=enabled* ]] || problem "vfiod is not enabled: $state"
  field FragmentPath "$state"
  [ "$REPLY" -ef /usr/lib/systemd/system/vfiod.service ] || problem "the unit is not the installed one: $state"
  [ -x /usr/bin/vfiod ] && [ -x "$VFIOCTL" ] || problem "no /usr/bin/vfiod or /usr/bin/vfioctl"
  verdict "installed as the README says, in the guest: $ran; vfiod active and enabled ($state)"
}

users_and_rule() {
  begin
  local u
  for u in "$IN_GROUP" "$OUTSIDER"; do
    id "$u" > /dev/null 2>&1 || useradd --no-create-home --shell /usr/sbin/nologin "$u" \
      || problem "useradd $u failed"
  done
  run_readme "### Who may move devices" '^$'
  local ran=$REPLY groups
  groups=$(id -nG "$IN_GROUP" 2>&1)
  [[ " $groups " == *" vfio "* ]] || problem "$IN_GROUP is not in vfio: $groups"
  [[ " $(id -nG "$OUTSIDER") " != *" vfio "* ]] || problem "$OUTSIDER is in vfio"
  [ -f /etc/polkit-1/rules.d/50-vfiod-vfio-group.rules ] || problem "the rule is not installed"
  verdict "users $IN_GROUP (groups: $groups) and $OUTSIDER (not in vfio); the README's polkit rule: $ran"
}

reads_open_to_all() {
  begin
  local u
  for u in root "$IN_GROUP" "$OUTSIDER"; do
    if [ $u = root ]; then ctl status; else ctl --as "$u" status; fi
    want_rc 0 - "vfioctl status as $u" && { [[ $(< "$WORK/ctl.out") == *'"gpu"'* ]] || problem "vfioctl status as $u does not show profile gpu"; }
    if [ $u = root ]; then ctl list; else ctl --as "$u" list; fi
    want_rc 0 - "vfioctl list as $u" && { [[ $(< "$WORK/ctl.out") == *0000:02:00.0* ]] || problem "vfioctl list as $u does not show 02:00.0"; }
  done
  verdict "reads are open to everyone: vfioctl status and list as root, $IN_GROUP and $OUTSIDER"
}

root_moves() {
  begin
  ctl bind gpu
  want_rc 0 - "bind gpu" && bound_ok "$GPU" "$AUD"
  local bind_ms=$CTL_MS
  ctl release gpu
  want_rc 0 - "release gpu" && home_ok "$GPU" "$AUD"
  verdict "as root under the unit as shipped: bind gpu (01:00.0 + 01:00.1) to vfio-pci in $bind_ms ms, release to bochs-drm and snd_hda_intel in $CTL_MS ms"
  begin
  ctl bind usb
  want_rc 0 - "bind usb" && bound_ok "$XHCI"
  bind_ms=$CTL_MS
  ctl release usb
  want_rc 0 - "release usb" && home_ok "$XHCI"
  verdict "as root under the unit as shipped: bind usb (the xHCI card 02:00.0) in $bind_ms ms, release to xhci_hcd in $CTL_MS ms"
  all_home
}

users_move() {
  begin
  ctl --as "$OUTSIDER" bind gpu
  want_rc 4 AccessDenied "bind gpu as $OUTSIDER"
  home_ok "$GPU" "$AUD"
  ctl bind usb
  want_rc 0 - "bind usb as root"
  ctl --as "$OUTSIDER" release usb
  want_rc 4 AccessDenied "release usb as $OUTSIDER"
  want_vfio "$XHCI"
  ctl release usb
  verdict "$OUTSIDER (not in vfio) is refused by polkitd: bind gpu and release usb exit 4 (AccessDenied), nothing moves"
  begin
  ctl --as "$IN_GROUP" bind gpu
  want_rc 0 - "bind gpu as $IN_GROUP" && bound_ok "$GPU" "$AUD"
  ctl --as "$IN_GROUP" release gpu
  want_rc 0 - "release gpu as $IN_GROUP" && home_ok "$GPU" "$AUD"
  ctl --as "$IN_GROUP" bind usb
  want_rc 0 - "bind usb as $IN_GROUP" && bound_ok "$XHCI"
  ctl --as "$IN_GROUP" release usb
  want_rc 0 - "release usb as $IN_GROUP" && home_ok "$XHCI"
  verdict "$IN_GROUP (in vfio, the shipped rule) may: bind and release gpu and usb through polkitd"
  all_home
}

native_journal() {
  begin
  journal_json -u vfiod -b
  local line native=0 stream=0 move= prio=
  while IFS= read -r line; do
    field _TRANSPORT "$line"
    case $REPLY in journal) native=$((native + 1)) ;; stdout) stream=$((stream + 1)) ;; esac
    if [ -z "$move" ] && [[ $line == *'"MESSAGE":"move done target=gpu '* ]] && [[ $line == *'"VFIOD_TARGET":"gpu"'* ]]; then
      move=$line; field PRIORITY "$line"; prio=$REPLY
    fi
  done < "$WORK/journal.json"
  [ -n "$move" ] || problem "no 'move done' entry with VFIOD_TARGET=gpu in journalctl -u vfiod"
  # vfiod's priority for INFO is 5 (notice); a stream's line is 6.
  [ "$prio" = 5 ] || problem "'move done' has PRIORITY=$prio"
  [ $stream -eq 0 ] || problem "$stream entries came through the stderr stream (_TRANSPORT=stdout)"
  # What an admin reads: `journalctl -u vfiod` shows MESSAGE alone, which
  # names the device, the step and the move.
  local steps=()
  while IFS= read -r line; do
    [[ $line == *"vfiod["*"]: step device=$GPU step=\""*'" target=gpu direction='* ]] && steps+=("$line")
  done < <(journalctl --no-pager -u vfiod -b 2>&1)
  [ ${#steps[@]} -gt 0 ] || problem "journalctl -u vfiod shows no line 'step device=$GPU step=\"...\" target=gpu direction=...'"
  for line in "${steps[@]:0:3}"; do note "journalctl -u vfiod: $line"; done
  verdict "vfiod logs natively under systemd (JOURNAL_STREAM matched): $native entries with _TRANSPORT=journal, none through the stderr stream; 'move done' has PRIORITY=5 and VFIOD_TARGET=gpu; journalctl -u vfiod shows ${#steps[@]} lines 'step device=$GPU step=\"...\" target=gpu direction=...'"
}

dbus_activation() {
  begin
  systemctl stop vfiod
  unit_show ActiveState
  [ "$REPLY" = ActiveState=inactive ] || problem "after systemctl stop: $REPLY"
  ctl --as "$OUTSIDER" status
  want_rc 0 - "vfioctl status as $OUTSIDER with vfiod stopped"
  unit_show ActiveState,ExecMainPID
  [[ $REPLY == *ActiveState=active* ]] || problem "vfiod.service after the call: $REPLY"
  verdict "D-Bus activation: after systemctl stop vfiod, vfioctl status as $OUTSIDER starts vfiod.service (${CTL_MS} ms; $REPLY)"
}

reload_good() {
  begin
  write_config host '
[profiles.xhci]
devices = ["0000:02:00.0"]'
  local t=${EPOCHREALTIME/./} rc
  systemctl reload vfiod > "$WORK/reload.out" 2>&1
  rc=$?
  [ $rc -eq 0 ] || problem "systemctl reload exited $rc: $(< "$WORK/reload.out")"
  ctl list
  want_rc 0 - "vfioctl list" && { [[ $(< "$WORK/ctl.out") == *'"xhci"'* ]] || problem "profile xhci is not there after the reload"; }
  verdict "systemctl reload vfiod with a good config: exit 0 in $(( (${EPOCHREALTIME/./} - t) / 1000 )) ms, profile xhci there"
}

reload_bad() {
  begin
  unit_show ExecMainPID
  local pid=$REPLY rc status
  # Line 3 has a key vfiod does not know.
  cat > "$CONFIG" <<'EOF'
[daemon]
unbind_timeout_ms = 3000
unbind_timout_ms = 5
EOF
  systemctl reload vfiod > "$WORK/reload.out" 2>&1
  rc=$?
  [ $rc -ne 0 ] || problem "systemctl reload exited 0"
  status=$(systemctl status vfiod --no-pager -n 10 2>&1)
  [[ $status == *"$CONFIG"* && $status == *"line 3"* && $status == *unbind_timout_ms* ]] \
    || problem "systemctl status vfiod does not name $CONFIG, line 3 and unbind_timout_ms: $(tail -4 <<< "$status" | tr '\n' ' ')"
  unit_show ExecMainPID,ActiveState
  [ "$REPLY" = "$pid ActiveState=active" ] || problem "vfiod after the refused reload: $REPLY (was $pid)"
  ctl list
  [[ $(< "$WORK/ctl.out") == *'"xhci"'* ]] || problem "the last good config (profile xhci) is not kept"
  verdict "systemctl reload vfiod with a bad config fails where the admin typed it (exit $rc: $(head -1 "$WORK/reload.out")), systemctl status names the file, line 3 and the key; vfiod runs on with the last good config"
  write_config host ""
  systemctl reload vfiod > "$WORK/reload.out" 2>&1 || note "reloading the lane's config: $(< "$WORK/reload.out")"
}

# A kernel call that does not return in unbind_timeout_ms: snd_hda_intel's
# unbind waits while its ALSA control node is open (this shell holds it).
error_in_journal() {
  begin
  k_node "$AUD" snd
  local node=$REPLY hold i line stuck= refused=
  exec {hold}<> "$node"
  ctl bind gpu --force
  want_rc 1 Timeout "bind gpu --force while $node is held"
  exec {hold}>&-
  for i in $(seq 200); do
    k_driver "$AUD"; [ -n "$REPLY" ] && break
    nap 0.05
  done
  ctl release gpu
  all_home
  journal_json -u vfiod -b -p err
  while IFS= read -r line; do
    [[ $line == *'"PRIORITY":"3"'* ]] || continue
    if [[ $line == *'"VFIOD_DEVICE":"0000:01:00.1"'* && $line == *'"VFIOD_STEP":'* ]]; then
      field VFIOD_STEP "$line"; stuck+="${stuck:+; }$REPLY"
    fi
    [[ $line == *refused* && $line == *"$CONFIG"* ]] && refused=1
  done < "$WORK/journal.json"
  [ -n "$stuck" ] || problem "no err entry with VFIOD_DEVICE=0000:01:00.1 and VFIOD_STEP in journalctl -u vfiod -p err"
  [ -n "$refused" ] || problem "the refused reload is not in journalctl -u vfiod -p err"
  verdict "journalctl -u vfiod -p err shows the refused reload and the unbind that did not return within unbind_timeout_ms (VFIOD_DEVICE=0000:01:00.1, VFIOD_STEP=${stuck:-none}); devices back home"
}

stop_with_devices_bound() {
  begin
  ctl bind gpu
  want_rc 0 - "bind gpu"
  systemctl stop vfiod
  want_vfio "$GPU" "$AUD"
  systemctl start vfiod || problem "systemctl start vfiod failed"
  want_vfio "$GPU" "$AUD"
  ctl status gpu
  # (the profile's state and its devices', each "vfio")
  want_rc 0 - "status gpu" && { [[ $(< "$WORK/ctl.out") =~ \"state\":\"(host|mixed|moving|error|unbound|stuck) ]] \
    && problem "profile gpu after the restart: $(< "$WORK/ctl.out")"; }
  ctl release gpu
  want_rc 0 - "release gpu after the restart" && home_ok "$GPU" "$AUD"
  verdict "systemctl stop with the GPU pair bound leaves it on vfio-pci; systemctl start: profile gpu is vfio, and release gives bochs-drm and snd_hda_intel back"
  all_home
}

security_score() {
  local text score
  text=$(systemd-analyze security vfiod --no-pager 2>&1)
  [[ $text =~ Overall\ exposure\ level\ for\ vfiod.service:\ ([0-9.]+\ [A-Z]+) ]] \
    || { fail "systemd-analyze security vfiod: no score: $(tail -2 <<< "$text")"; return; }
  score=${BASH_REMATCH[1]}
  echo "$text" > "$out/security.txt"
  if [[ $score =~ ^([0-9])\.([0-9])\  ]] && [ "${BASH_REMATCH[1]}${BASH_REMATCH[2]}" -le 25 ]; then
    pass "systemd-analyze security vfiod (the running unit): $score (README: 1.8 offline; kept at 2.5 or below)"
  else
    fail "systemd-analyze security vfiod (the running unit): $score, above 2.5"
  fi
}

# DESIGN §10 with systemd as PID 1: a stand-in display manager (a unit
# aliased as display-manager.service whose process holds the boot VGA's
# /dev/dri/cardN) is stopped through systemd's D-Bus API for a handoff bind
# of 00:02.0 (fbcon unbound, the GPU on vfio-pci) and started again at the
# release (fbcon bound, bochs-drm back).
display_manager_handoff() {
  local unit=/etc/systemd/system/lane-dm.service card pid state i line named=
  begin
  k_node "$HOSTVGA" drm; card=$REPLY
  printf '%s\n' "[Unit]" "Description=A stand-in display manager holding $card (habitat.sh)" \
    "[Service]" "ExecStart=/bin/sh -c 'exec sleep infinity 3<$card'" \
    "[Install]" "Alias=display-manager.service" > "$unit"
  systemctl daemon-reload
  systemctl enable --now lane-dm.service > "$WORK/dm.out" 2>&1 || problem "systemctl enable --now lane-dm: $(< "$WORK/dm.out")"
  for i in $(seq 100); do
    field MainPID "$(systemctl show -p MainPID lane-dm.service)"; pid=$REPLY
    [ "$pid" != 0 ] && [ "$(readlink "/proc/$pid/fd/3" 2>/dev/null)" = "$card" ] && break
    nap 0.05
  done
  [ "$(readlink "/proc/$pid/fd/3" 2>/dev/null)" = "$card" ] || problem "the stand-in display manager does not hold $card"
  write_config host "$(printf '%s\n' '[profiles.hostvga]' 'devices = ["0000:00:02.0"]' 'handoff = true')"
  systemctl reload vfiod || problem "systemctl reload vfiod with profile hostvga failed"
  ctl bind hostvga
  want_rc 0 - "bind hostvga" && want_vfio "$HOSTVGA"
  state=$(systemctl is-active lane-dm.service)
  [ "$state" = inactive ] || problem "lane-dm.service is $state with 00:02.0 on vfio-pci"
  k_fbcon; [ "$REPLY" = unbound ] || problem "fbcon is $REPLY with 00:02.0 on vfio-pci"
  ctl release hostvga
  want_rc 0 - "release hostvga" && home_ok "$HOSTVGA"
  state=$(systemctl is-active lane-dm.service)
  [ "$state" = active ] || problem "lane-dm.service is $state after the release"
  k_fbcon; [ "$REPLY" = bound ] || problem "fbcon is $REPLY after the release"
  journal_json -u vfiod -b
  while IFS= read -r line; do
    [[ $line == *'"VFIOD_STEP":"stop display manager lane-dm.service"'* ]] && named=1
  done < "$WORK/journal.json"
  [ -n "$named" ] || problem "vfiod's journal has no step \"stop display manager lane-dm.service\""
  verdict "handoff under systemd: lane-dm.service (display-manager.service, holding $card) stopped by vfiod and named in its journal, fbcon unbound, 00:02.0 on vfio-pci; at release bochs-drm, fbcon and lane-dm.service back"
  systemctl disable --now lane-dm.service > /dev/null 2>&1
  rm -f "$unit"
  systemctl daemon-reload
  write_config host ""
  systemctl reload vfiod || fail "systemctl reload vfiod without profile hostvga failed"
  all_home
}

# The early claim (DESIGN §10) as an admin gets it: boot = "vfio" for gpu
# through `systemctl reload vfiod`; the udev rule and this Debian's
# initramfs-tools hook appear, with the pair's addresses.
CLAIM_RULE=/etc/udev/rules.d/61-vfiod-early-claim.rules
CLAIM_HOOK=/etc/initramfs-tools/hooks/vfiod
claim_line() { # ADDR: the rule's line for it
  REPLY="ACTION==\"add\", SUBSYSTEM==\"pci\", KERNEL==\"$1\", ATTR{driver_override}=\"vfio-pci\", RUN{builtin}+=\"kmod load vfio_pci\", RUN+=\"/bin/sh -c 'echo %k > /sys/bus/pci/drivers_probe'\""
}
early_claim_written() {
  begin
  local rc a lines=() line hook
  [ -e "$CLAIM_RULE" ] && problem "$CLAIM_RULE is there before any boot = \"vfio\" profile"
  [ -d /etc/initramfs-tools/hooks ] || problem "no /etc/initramfs-tools/hooks (tests/prereqs all installs initramfs-tools)"
  write_config vfio ""
  systemctl reload vfiod > "$WORK/reload.out" 2>&1
  rc=$?
  [ $rc -eq 0 ] || problem "systemctl reload exited $rc: $(< "$WORK/reload.out")"
  if [ -f "$CLAIM_RULE" ]; then
    while IFS= read -r line; do [[ $line == ACTION* ]] && lines+=("$line"); done < "$CLAIM_RULE"
    for a in "$GPU" "$AUD"; do
      claim_line "$a"
      [[ " ${lines[*]} " == *" $REPLY "* ]] || problem "$CLAIM_RULE has no line '$REPLY'"
    done
    # usb boots on its host driver: only the pair is claimed.
    [ ${#lines[@]} -eq 2 ] || problem "$CLAIM_RULE has ${#lines[@]} rules, not the pair's 2: ${lines[*]}"
  else
    problem "no $CLAIM_RULE after the reload"
  fi
  if [ -x "$CLAIM_HOOK" ]; then
    hook=$(< "$CLAIM_HOOK")
    [[ $hook == *"manual_add_modules vfio_pci vfio vfio_iommu_type1"* && $hook == *"$CLAIM_RULE"* ]] \
      || problem "$CLAIM_HOOK does not add the vfio modules and the rule: $hook"
  else
    problem "no executable $CLAIM_HOOK after the reload"
  fi
  journal_json -u vfiod -b -g 'regenerate the initramfs'
  [[ $(< "$WORK/journal.json") == *'update-initramfs -u -k all'* ]] \
    || problem "vfiod did not say to run update-initramfs -u -k all"
  verdict "boot = \"vfio\" for gpu through systemctl reload vfiod: $CLAIM_RULE claims 01:00.0 and 01:00.1 (driver_override vfio-pci at add, nothing else), $CLAIM_HOOK adds the vfio modules and the rule, vfiod says to run update-initramfs -u -k all"
  [ -x "$CLAIM_HOOK" ] && initramfs_hook_runs
}

# The hook as mkinitramfs runs it (hook-functions, DESTDIR, version), into
# a scratch tree: the modules and the rule land where the initramfs's
# udevd and modprobe find them.
initramfs_hook_runs() {
  begin
  local dest=$WORK/initramfs version rc ko=
  version=$(uname -r)
  rm -rf "$dest"; mkdir -p "$dest"
  sh -n "$CLAIM_HOOK" 2> "$WORK/hook.out" || problem "sh -n $CLAIM_HOOK: $(< "$WORK/hook.out")"
  [ "$("$CLAIM_HOOK" prereqs)" = "" ] || problem "'$CLAIM_HOOK prereqs' printed something"
  DESTDIR=$dest version=$version verbose=n CONFDIR=/etc/initramfs-tools \
    MODULESDIR=/lib/modules/$version "$CLAIM_HOOK" > "$WORK/hook.out" 2>&1
  rc=$?
  [ $rc -eq 0 ] || problem "the hook exited $rc: $(< "$WORK/hook.out")"
  for f in "$dest"/usr/lib/modules/"$version"/kernel/drivers/vfio/pci/vfio-pci.ko* \
           "$dest"/lib/modules/"$version"/kernel/drivers/vfio/pci/vfio-pci.ko*; do
    [ -e "$f" ] && ko=${f#"$dest"}
  done
  [ -n "$ko" ] || problem "no vfio-pci.ko in the scratch initramfs: $(cd "$dest" && find . -name '*.ko*' | head -5 | tr '\n' ' ')"
  cmp -s "$CLAIM_RULE" "$dest$CLAIM_RULE" || problem "the scratch initramfs has no copy of $CLAIM_RULE"
  verdict "the initramfs-tools hook, run as mkinitramfs runs it into a scratch tree: exit 0, $ko (and its dependencies) and $CLAIM_RULE in it"
}

prepare_reboot() {
  # The GPU's host driver in the kernel before vfiod starts: bochs (both
  # displays' driver) is loaded by udev's coldplug as on any Debian, and
  # vfiod waits here for the coldplug to be over (udev-settle). Without
  # the rule, that coldplug gives 01:00.0 to bochs-drm (boot 1's kernel
  # log says so: checked on boot 2).
  mkdir -p /etc/systemd/system/vfiod.service.d
  printf '[Unit]\nWants=systemd-udev-settle.service\nAfter=systemd-udev-settle.service\n' \
    > /etc/systemd/system/vfiod.service.d/lane-after-coldplug.conf
  echo "$t_start" > "$STATE/boot1"
  sync
  : > /run/lane-rebooting
  journalctl --no-pager -b -o short-monotonic > "$out/journal-boot1.txt" 2>&1
  note "boot 1 done: boot = \"vfio\" for gpu, the early claim written, vfiod after udev's coldplug; systemctl reboot"
  systemctl reboot || { rm -f /run/lane-rebooting; fail "systemctl reboot failed"; }
}

# --- boot 2 -----------------------------------------------------------

overlay_kept() {
  begin
  unit_show UnitFileState
  [ "$REPLY" = UnitFileState=enabled ] || problem "vfiod is $REPLY"
  [ -x /usr/bin/vfiod ] || problem "/usr/bin/vfiod is gone"
  grep -q '^boot = "vfio"' "$CONFIG" 2>/dev/null || problem "$CONFIG lost boot = \"vfio\""
  [ -f /etc/polkit-1/rules.d/50-vfiod-vfio-group.rules ] || problem "the polkit rule is gone"
  verdict "after systemctl reboot the overlay kept the installed vfiod (enabled), $CONFIG and the polkit rule"
}

# Boot 2: bochs (the GPU's host driver) was loaded by udev's coldplug
# before vfiod started, and the rule kept it off the pair: 01:00.0 and
# 01:00.1 went straight to vfio-pci at add, vfiod had nothing to move.
early_claim_at_boot() {
  begin
  local line a vfiod_at bochs_host= gpu_boot1= touched= steps= planned= unit
  want_vfio "$GPU" "$AUD"
  for a in "$GPU" "$AUD"; do
    k_override "$a"; [ "$REPLY" = vfio-pci ] || problem "${a#0000:} has driver_override '$REPLY', not vfio-pci"
  done
  unit_show ActiveState,Result,NRestarts
  unit=$REPLY
  [[ $unit == *ActiveState=active* && $unit == *Result=success* && $unit == *NRestarts=0* ]] \
    || problem "vfiod's start: $unit"
  unit_show ExecMainStartTimestampMonotonic
  vfiod_at=${REPLY#*=}
  # The control: without the rule, boot 1's coldplug gave 01:00.0 to bochs-drm.
  grep -q 'Initialized bochs-drm .*0000:01:00.0' "$out/journal-boot1.txt" && gpu_boot1=1
  [ -n "$gpu_boot1" ] || problem "boot 1's kernel log has no bochs-drm for 01:00.0 (the control without the rule)"
  journal_json -b -k
  while IFS= read -r line; do
    if [ -z "$bochs_host" ] && [[ $line == *'Initialized bochs-drm'*'0000:00:02.0'* ]]; then
      field __MONOTONIC_TIMESTAMP "$line"; bochs_host=$REPLY
    fi
    # Any word of a host driver on the pair: bochs-drm's, snd_hda_intel's.
    [[ $line == *'"MESSAGE":'*bochs*'0000:01:00.0'* || $line == *'"MESSAGE":"snd_hda_intel 0000:01:00.1'* ]] \
      && [[ $line =~ \"MESSAGE\":\"([^\"]*)\" ]] && touched+="${touched:+; }${BASH_REMATCH[1]}"
  done < "$WORK/journal.json"
  if [ -z "$bochs_host" ]; then problem "no 'Initialized bochs-drm ... 0000:00:02.0' in boot 2's kernel log: bochs was not loaded"
  elif [ -z "$vfiod_at" ] || [ "$vfiod_at" -le "$bochs_host" ]; then
    problem "vfiod started at ${vfiod_at:-?} us, not after bochs-drm took 00:02.0 at $bochs_host us"
  fi
  [ -z "$touched" ] || problem "a host driver touched the pair: $touched"
  # vfiod's boot bind of gpu: planned, and not one step on the pair (no
  # override written, nothing unbound, nothing probed).
  journal_json -b -u vfiod
  while IFS= read -r line; do
    [[ $line == *'"MESSAGE":"move planned '* && $line == *'"VFIOD_TARGET":"gpu"'* ]] && planned=1
    if [[ $line == *'"VFIOD_STEP":'* && ( $line == *'"VFIOD_DEVICE":"0000:01:00.0"'* || $line == *'"VFIOD_DEVICE":"0000:01:00.1"'* ) ]]; then
      [[ $line =~ \"VFIOD_DEVICE\":\"0000:(..:..\..)\" ]] && a=${BASH_REMATCH[1]}
      [[ $line =~ \"VFIOD_STEP\":\"([^\"]*)\" ]] && steps+="${steps:+; }$a ${BASH_REMATCH[1]}"
    fi
  done < "$WORK/journal.json"
  [ -n "$planned" ] || problem "no boot bind of gpu ('move planned') in vfiod's log"
  [ -z "$steps" ] || problem "vfiod moved the pair itself: $steps"
  journal_json -u vfiod -b -p warning
  [[ $(< "$WORK/journal.json") == *'{'* ]] && problem "vfiod warned at boot: $(head -c 400 "$WORK/journal.json")"
  verdict "the early claim across systemctl reboot: bochs-drm took 00:02.0 at $((${bochs_host:-0} / 1000)) ms and vfiod started at $((${vfiod_at:-0} / 1000)) ms, after it; no host driver touched 01:00.0 or 01:00.1 (boot 1 without the rule: bochs-drm took 01:00.0), both on vfio-pci with driver_override vfio-pci from the rule, vfiod's boot bind of gpu had no step to take ($unit)"
  begin
  # Nobody saw the host driver: vfiod does not make one up.
  ctl status 01:00.0
  [[ $(< "$WORK/ctl.out") =~ \"host_driver\":\ ?null ]] || problem "vfioctl --json status 01:00.0 names a host driver: $(head -c 300 "$WORK/ctl.out")"
  "$VFIOCTL" status 01:00.0 > "$WORK/status.txt" 2>&1
  grep -q 'host driver unknown' "$WORK/status.txt" || problem "vfioctl status 01:00.0 does not say the host driver is unknown: $(tr '\n' ' ' < "$WORK/status.txt")"
  ctl release gpu
  want_rc 0 - "release gpu" && home_ok "$GPU" "$AUD"
  verdict "a pair claimed at add has no known host driver (host_driver null, 'host driver unknown'); release gives it to the driver the kernel picks: bochs-drm and snd_hda_intel, driver_override cleared"
  all_home
}

# The profile goes: the rule and the hook go with it at the reload.
early_claim_removed() {
  begin
  local rc
  write_config host ""
  systemctl reload vfiod > "$WORK/reload.out" 2>&1
  rc=$?
  [ $rc -eq 0 ] || problem "systemctl reload exited $rc: $(< "$WORK/reload.out")"
  [ -e "$CLAIM_RULE" ] && problem "$CLAIM_RULE is still there"
  [ -e "$CLAIM_HOOK" ] && problem "$CLAIM_HOOK is still there"
  journal_json -u vfiod -b -g 'early claim removed'
  [[ $(< "$WORK/journal.json") == *61-vfiod-early-claim.rules* ]] || problem "vfiod did not say it removed the rule"
  verdict "boot = \"vfio\" gone from gpu through systemctl reload vfiod: $CLAIM_RULE and $CLAIM_HOOK removed, and said"
}

# Every release of both boots gave its functions back healthy: vfio-pci's
# own unbind uevent, read after the release (libudev then names the host
# driver the function went to), is no host driver letting go. Before the
# fix the first run of this lane's early claim had 9 such alarms in boot 1.
releases_healthy() {
  begin
  local line n1=0 n2=0 a
  while IFS= read -r line; do
    [[ $line == *'did not come back healthy'* ]] && n1=$((n1 + 1))
  done < "$out/journal-boot1.txt"
  journal_json -u vfiod -b -p err
  while IFS= read -r line; do
    [[ $line == *'did not come back healthy'* ]] && n2=$((n2 + 1))
  done < "$WORK/journal.json"
  [ $n1 -eq 0 ] || problem "boot 1: $n1 releases were reported as 'did not come back healthy'"
  [ $n2 -eq 0 ] || problem "boot 2: $n2 releases were reported as 'did not come back healthy'"
  for a in 01:00.0 01:00.1; do
    ctl status "$a"
    [[ $(< "$WORK/ctl.out") =~ \"health\":\ ?\"ok\" ]] || problem "$a after its release: $(head -c 300 "$WORK/ctl.out")"
  done
  verdict "no release of either boot was called unhealthy (journal: none of 'did not come back healthy'); 01:00.0 and 01:00.1, released in this boot, have Health ok"
}

# --- the extra scripts ------------------------------------------------

# Every executable tests/kernel/habitat.d/*.sh, or the paths listed in
# HABITAT_EXTRA, in the guest as it is now (tests/kernel/README.md says
# what it offers): each prints its own PASS:/FAIL: lines; a script that
# printed none, or exited non-zero without a FAIL: line, is a FAIL.
run_extras() {
  local scripts=() s rc line checks failed
  if [ -n "${HABITAT_EXTRA+set}" ]; then read -ra scripts <<< "$HABITAT_EXTRA"
  else for s in "$LANE_DIR"/habitat.d/*.sh; do [ -x "$s" ] && scripts+=("$s"); done; fi
  for s in "${scripts[@]}"; do
    note "running $s"
    HABITAT_IN_GROUP=$IN_GROUP HABITAT_OUTSIDER=$OUTSIDER VFIOCTL=$VFIOCTL LANE_DIR=$LANE_DIR \
      "$s" < /dev/null 2>&1 | tee "$out/${s##*/}.log"
    rc=${PIPESTATUS[0]} checks=0 failed=0
    while IFS= read -r line; do
      case $line in PASS:*) checks=$((checks + 1)) ;; FAIL:*) checks=$((checks + 1)) failed=1 ;; esac
    done < "$out/${s##*/}.log"
    [ $checks -gt 0 ] || fail "$s printed no PASS:/FAIL: line (exit $rc)"
    [ $rc -eq 0 ] || [ $failed = 1 ] || fail "$s exited $rc without a FAIL: line"
  done
}

if [ ! -e "$STATE/boot1" ]; then
  check_boot 1
  install_as_readme_says
  users_and_rule
  if [ "${HABITAT_ONLY:-}" = extra ]; then
    run_extras
  else
    reads_open_to_all
    root_moves
    users_move
    native_journal
    dbus_activation
    reload_good
    reload_bad
    error_in_journal
    stop_with_devices_bound
    security_score
    display_manager_handoff
    early_claim_written
    uptime_s
    summary "boot 1 checks done at uptime ${REPLY}s"
    prepare_reboot
    exit 0
  fi
else
  check_boot 2
  overlay_kept
  early_claim_at_boot
  early_claim_removed
  releases_healthy
  run_extras
fi
journalctl --no-pager -b -o short-monotonic > "$out/journal-boot$([ -e "$STATE/boot1" ] && echo 2 || echo 1).txt" 2>&1
uptime_s
summary "boot $([ -e "$STATE/boot1" ] && echo 2 || echo 1): done at uptime ${REPLY}s"
[ "$FAILS" -eq 0 ]
