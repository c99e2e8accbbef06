# What the libvirt scripts in the systemd lane's guest share (checks.sh,
# bench.sh, hook-parts.sh), sourced with `here` (this directory), WORK and
# LANE_KIND set.
export LC_ALL=C
# Nothing here may reach vfiod other than the way the hook does: the
# default system bus.
unset DBUS_SYSTEM_BUS_ADDRESS
VIRSH=(virsh -q -c qemu:///system)

# The real-kernel lane's helpers (scenarios.sh): the lane's devices and
# their host drivers, pass/fail/note, nap, problem, want*, drivers_now;
# and the sysfs reads they need (guest/sysfs.sh: k_driver, k_group, ...).
VFIOCTL=vfioctl OUTCOMES=/dev/null
. "$here/../scenarios.sh"
. "$here/../guest/sysfs.sh"

libvirt_answers() { "${VIRSH[@]}" version > /dev/null 2>&1; }
# Until libvirtd answers (after a start or restart), at most 60 s.
await_libvirt() {
  local _
  for _ in $(seq 600); do libvirt_answers && return 0; nap 0.1; done
  return 1
}
