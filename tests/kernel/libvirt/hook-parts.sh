#!/bin/bash
# Where a hook's time goes (BENCHMARKS.md, "VM start with the hook"), in the
# systemd lane's guest: a process spawn, vfioctl's start and connection, the
# hook at prepare begin and release end, virsh nodedev-detach/reattach and
# virsh's own start, 5 rounds; then vfiod's moves from its journal.
set -u
here=$(cd "$(dirname "$0")" && pwd)
WORK=/run/lane-parts; mkdir -p $WORK
LANE_KIND=parts
. "$here/guest-env.sh"
mkdir -p /etc/vfiod
printf '[daemon]\nunbind_timeout_ms = 8000\n[profiles.gpu]\ndevices = ["0000:01:00.0", "0000:01:00.1"]\n' > /etc/vfiod/vfiod.toml
systemctl restart vfiod libvirtd
await_libvirt || { echo "FAIL: [parts] libvirtd does not answer"; exit 1; }
cat > $WORK/h.xml <<X
<domain type='qemu'><name>vm-hook</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>
<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev>
<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source></hostdev>
</devices></domain>
X
failed=
ms() { local t=${EPOCHREALTIME/./}; REPLY=$(( (10#$t - 10#$1) / 1000 )); }
for i in 1 2 3 4 5; do
  t=${EPOCHREALTIME/./}; vfioctl status > /dev/null; ms $t; s=$REPLY
  t=${EPOCHREALTIME/./}; /bin/true; ms $t; tr=$REPLY
  t=${EPOCHREALTIME/./}; vfioctl bind gpu > /dev/null 2>&1; ms $t; b=$REPLY
  t=${EPOCHREALTIME/./}; vfioctl release gpu > /dev/null 2>&1; ms $t; r=$REPLY
  t=${EPOCHREALTIME/./}; /etc/libvirt/hooks/qemu.d/vfiod vm-hook prepare begin - < $WORK/h.xml > $WORK/hook.out 2>&1; ms $t; hb=$REPLY
  drivers_now; d1=$REPLY
  [[ $d1 == *"01:00.0=vfio-pci 01:00.1=vfio-pci"* ]] || failed+=" round $i: the hook did not bind the pair ($d1);"
  t=${EPOCHREALTIME/./}; /etc/libvirt/hooks/qemu.d/vfiod vm-hook release end - < $WORK/h.xml >> $WORK/hook.out 2>&1; ms $t; hr=$REPLY
  t=${EPOCHREALTIME/./}; "${VIRSH[@]}" nodedev-detach pci_0000_01_00_0 > /dev/null; "${VIRSH[@]}" nodedev-detach pci_0000_01_00_1 > /dev/null; ms $t; vd=$REPLY
  drivers_now; d2=$REPLY
  t=${EPOCHREALTIME/./}; "${VIRSH[@]}" nodedev-reattach pci_0000_01_00_0 > /dev/null; "${VIRSH[@]}" nodedev-reattach pci_0000_01_00_1 > /dev/null; ms $t; vr=$REPLY
  t=${EPOCHREALTIME/./}; "${VIRSH[@]}" version > /dev/null; ms $t; vv=$REPLY
  echo "PARTS: round $i: /bin/true ${tr} ms; vfioctl status ${s} ms; vfioctl bind gpu ${b} ms, release ${r} ms; hook prepare ${hb} ms, release ${hr} ms ($d1); virsh nodedev-detach x2 ${vd} ms, reattach x2 ${vr} ms ($d2); virsh version ${vv} ms"
done
cat $WORK/hook.out | head -5 | sed 's/^/PARTS: hook said: /'
journalctl -u vfiod -b -o cat --no-pager | grep -E "^move (planned|done)" | tail -24 | sed 's/^/PARTS: /'
drivers_now
[[ $REPLY == *"01:00.0=bochs-drm 01:00.1=snd_hda_intel"* ]] || failed+=" the pair is not home at the end ($REPLY)"
if [ -z "$failed" ]; then echo "PASS: [parts] 5 rounds"; else echo "FAIL: [parts]$failed"; exit 1; fi
