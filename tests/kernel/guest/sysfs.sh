# The real kernel's PCI devices as a lane script reads them, with bash
# builtins (a process costs 30-100 ms in the TCG guest): the backend
# functions of scenarios.sh that read and write sysfs, sourced by
# guest/real.sh and guest/habitat.sh (after scenarios.sh: nap, note).
k_driver() {
  REPLY=
  local back=$PWD
  if cd -P "/sys/bus/pci/devices/$1/driver" 2>/dev/null; then REPLY=${PWD##*/}; cd "$back" || return; fi
}
k_override() {
  REPLY=
  read -r REPLY < "/sys/bus/pci/devices/$1/driver_override" || REPLY=
  [ "$REPLY" = "(null)" ] && REPLY=
}
k_group() {
  REPLY=
  local back=$PWD
  if cd -P "/sys/bus/pci/devices/$1/iommu_group" 2>/dev/null; then REPLY=${PWD##*/}; cd "$back" || return; fi
}
k_vfio_node() { [ -e "/dev/vfio/$1" ]; }
k_vfio_loaded() { [ -d /sys/bus/pci/drivers/vfio-pci ]; }
k_node() { # ADDR drm|snd; a driver just bound may register them a moment later
  local f i
  REPLY=
  for i in $(seq 250); do
    case $2 in
      drm) for f in "/sys/bus/pci/devices/$1/drm/card"*; do [ -e "$f" ] && REPLY=/dev/dri/${f##*/}; done ;;
      snd) for f in "/sys/bus/pci/devices/$1/sound/card"*/controlC*; do [ -e "$f" ] && REPLY=/dev/snd/${f##*/}; done ;;
    esac
    [ -n "$REPLY" ] && [ -e "$REPLY" ] && return 0
    nap 0.02
  done
  note "no $2 node under ${1#0000:} after 5 s"
}
k_fbcon() {
  local v name bind
  REPLY=unbound
  for v in /sys/class/vtconsole/vtcon*; do
    read -r name < "$v/name"; read -r bind < "$v/bind"
    [[ $name == *"frame buffer device"* && $bind = 1 ]] && REPLY=bound
  done
}
k_fb() { # ADDR: each /sys/class/graphics/fbN whose device is ADDR, named as /proc/fb does
  local f line back=$PWD
  REPLY=
  for f in /sys/class/graphics/fb[0-9]*; do
    cd -P "$f/device" 2>/dev/null || continue
    if [ "${PWD##*/}" = "$1" ]; then
      while read -r line; do [[ $line == "${f##*/fb} "* ]] && REPLY+="${line#* } "; done < /proc/fb
    fi
    cd "$back" || return
  done
  REPLY=${REPLY% }
}
k_put_back() { # ADDR DRIVER: what an admin would type
  local d=/sys/bus/pci/devices/$1
  echo > "$d/driver_override"
  k_driver "$1"
  [ -n "$REPLY" ] && [ "$REPLY" != "$2" ] && echo "$1" > "$d/driver/unbind"
  echo "$1" > /sys/bus/pci/drivers_probe
}
