//! libvirt and firmware: whether QEMU's user can read the UEFI firmware
//! (OVMF / edk2), whether vfiod's hook is installed, and domains that take
//! the target with `managed='yes'`.

use std::collections::BTreeSet;

use super::{Context, Findings, and_list};
use vfiod_host::facts::{FirmwareImage, QemuConf, QemuConfValue};

pub(super) fn check(cx: &Context<'_>, out: &mut Findings) {
    ovmf(cx, out);
    hook(cx, out);
    if cx.scope.is_some() {
        managed(cx, out);
    }
}

/// `libvirt-qemu:kvm`, with where it comes from.
fn qemu_identity(conf: &QemuConf) -> (String, String, String) {
    let user = conf.user.effective().to_owned();
    let group = conf.group.effective().to_owned();
    let origin = match (&conf.user, &conf.group) {
        (QemuConfValue::Set(_), QemuConfValue::Set(_)) => format!("set in {}", conf.path.display()),
        (QemuConfValue::Unset { hint: Some(_) }, _)
        | (_, QemuConfValue::Unset { hint: Some(_) }) => format!(
            "{} leaves user/group unset: libvirt's build default, as its commented-out lines say",
            conf.path.display()
        ),
        _ => format!(
            "{} leaves user/group unset: libvirt then runs QEMU as root, unless it was built with another default",
            conf.path.display()
        ),
    };
    (user, group, origin)
}

fn ovmf(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "libvirt.ovmf";
    let conf = cx.host.qemu_conf.as_ref();
    let Some(images) = &cx.host.firmware else {
        out.unknown(
            ID,
            "which UEFI firmware QEMU would use (descriptors in /usr/share/qemu/firmware and /etc/qemu/firmware; firmware in a machine file's [host])",
        );
        return;
    };
    if images.is_empty() {
        out.warn(
            ID,
            "no UEFI firmware: no descriptor in /usr/share/qemu/firmware or /etc/qemu/firmware names one, so virt-manager offers BIOS only (a GPU passed through wants UEFI). Install OVMF (Debian/Ubuntu: ovmf; Arch, Fedora: edk2-ovmf)",
        );
        return;
    }
    let describe = |image: &FirmwareImage| match &image.stat {
        Some(stat) => format!("{} ({})", image.path.display(), stat.describe()),
        None => image.path.display().to_string(),
    };
    let missing: Vec<String> = images
        .iter()
        .filter(|i| i.stat.is_none())
        .map(|image| match &image.descriptor {
            Some(d) => format!("{} (named by {})", image.path.display(), d.display()),
            None => image.path.display().to_string(),
        })
        .collect();
    let missing_part = (!missing.is_empty()).then(|| {
        format!(
            "UEFI firmware is missing: {} (reinstall the OVMF / edk2 package, or remove the stale descriptor)",
            and_list(&missing)
        )
    });
    let present: Vec<&FirmwareImage> = images.iter().filter(|i| i.stat.is_some()).collect();
    let listed: Vec<String> = present.iter().map(|i| describe(i)).collect();
    let Some(conf) = conf else {
        match missing_part {
            Some(missing) => out.fail(ID, missing),
            None => out.ok(
                ID,
                format!(
                    "UEFI firmware: {}; who runs QEMU is unknown (no /etc/libvirt/qemu.conf here)",
                    listed.join(", ")
                ),
            ),
        }
        return;
    };
    let (user, group, origin) = qemu_identity(conf);
    let mut groups: BTreeSet<String> = BTreeSet::from([group.clone()]);
    if let Some(accounts) = &cx.host.accounts {
        groups.extend(accounts.groups_of(&user));
    }
    let unreadable: Vec<String> = present
        .iter()
        .filter(|i| {
            i.stat
                .as_ref()
                .is_some_and(|s| !s.readable_by(&user, &groups))
        })
        .map(|i| describe(i))
        .collect();
    let unreadable_part = (!unreadable.is_empty()).then(|| {
        format!(
            "QEMU runs as {user}:{group} ({origin}) and cannot read {}: virt-manager offers no UEFI firmware and UEFI guests do not start. Set user and group in {} (e.g. group = \"kvm\" when the files belong to kvm) and restart libvirtd, or make the files readable (chmod 0644)",
            and_list(&unreadable),
            conf.path.display()
        )
    });
    match (unreadable_part, missing_part) {
        (None, None) => out.ok(
            ID,
            format!(
                "QEMU runs as {user}:{group} ({origin}) and can read the UEFI firmware: {}",
                listed.join(", ")
            ),
        ),
        (Some(one), None) | (None, Some(one)) => out.fail(ID, one),
        (Some(unreadable), Some(missing)) => out.fail(ID, format!("{unreadable}. {missing}")),
    }
}

fn hook(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "libvirt.hook";
    let Some(hooks) = &cx.host.hooks else {
        out.unknown(
            ID,
            "whether vfiod's libvirt hook is installed (/etc/libvirt/hooks/qemu.d; a machine file does not describe it)",
        );
        return;
    };
    let ours: Vec<_> = hooks.iter().filter(|h| h.calls_vfioctl).collect();
    if let Some(hook) = ours.iter().find(|h| h.executable) {
        out.ok(
            ID,
            format!(
                "vfiod's hook {} is installed: libvirt asks vfiod before a VM starts and after it stops",
                hook.path.display()
            ),
        );
    } else if let Some(hook) = ours.first() {
        out.warn(
            ID,
            format!(
                "{} calls vfioctl but is not executable, so libvirt skips it: chmod +x it and restart libvirtd",
                hook.path.display()
            ),
        );
    } else {
        out.warn(
            ID,
            "vfiod's hook is not installed: libvirt starts VMs without asking vfiod, so profiles' devices stay on their host drivers. Install systemd/vfiod-libvirt-hook as /etc/libvirt/hooks/qemu.d/vfiod (executable) and restart libvirtd",
        );
    }
}

fn managed(cx: &Context<'_>, out: &mut Findings) {
    const ID: &str = "libvirt.managed";
    let Some(scope) = &cx.scope else {
        return;
    };
    let Some(domains) = &cx.host.domains else {
        out.unknown(
            ID,
            format!(
                "whether a libvirt domain takes {} with managed='yes' (/etc/libvirt/qemu/*.xml; a machine file does not describe domains)",
                scope.target
            ),
        );
        return;
    };
    let mut clean = Vec::new();
    let mut any = false;
    for domain in domains {
        for hostdev in &domain.hostdevs {
            if !scope.set.iter().any(|d| d.address == hostdev.address) {
                continue;
            }
            if hostdev.managed {
                any = true;
                out.warn(
                    ID,
                    format!(
                        "domain {} ({}) takes {} with managed='yes': libvirt detaches and reattaches it by itself, behind vfiod's back, and bus-resets it under its host driver; once a managed='no' domain has used the device, libvirt leaves it on vfio-pci when this one stops. Set managed='no' (virsh edit {}) and let vfiod's hook move it",
                        cx.domain_name(domain),
                        cx.domain_file(domain),
                        hostdev.address,
                        cx.domain_name(domain)
                    ),
                );
            } else {
                clean.push(format!("{} ({})", cx.domain_name(domain), hostdev.address));
            }
        }
    }
    if !any {
        let mut message = format!(
            "no libvirt domain takes {} with managed='yes'",
            scope.target
        );
        if !clean.is_empty() {
            clean.sort();
            clean.dedup();
            message.push_str(&format!("; managed='no' in {}", and_list(&clean)));
        }
        out.ok(ID, message);
    }
}
