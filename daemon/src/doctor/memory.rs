//! Memory: hugepages reserved or not, and the memory the VMs that use the
//! target pin (a VM with a passed-through device pins all of its RAM: the
//! device may DMA into any of it).

use super::{Context, Findings, and_list, size_kb};
use vfiod_host::facts::Domain;

pub(super) fn check(cx: &Context<'_>, out: &mut Findings) {
    let domains = relevant_domains(cx);
    hugepages(cx, domains.as_deref(), out);
    if cx.scope.is_some() {
        pinned(cx, domains.as_deref(), out);
    }
}

/// Without a target every domain; with one, those its profile names and
/// those that list one of its functions. `None` when unknown.
fn relevant_domains<'a>(cx: &'a Context<'_>) -> Option<Vec<&'a Domain>> {
    let domains = cx.host.domains.as_ref()?;
    Some(match &cx.scope {
        None => domains.iter().collect(),
        Some(scope) => domains
            .iter()
            .filter(|domain| {
                scope.vms.contains(&domain.name)
                    || domain
                        .hostdevs
                        .iter()
                        .any(|h| scope.set.iter().any(|d| d.address == h.address))
            })
            .collect(),
    })
}

fn hugepages(cx: &Context<'_>, domains: Option<&[&Domain]>, out: &mut Findings) {
    const ID: &str = "memory.hugepages";
    let Some(pools) = &cx.host.hugepages else {
        out.unknown(
            ID,
            "the hugepage pools (/sys/kernel/mm/hugepages; hugepages in a machine file's [host])",
        );
        return;
    };
    let wanting: Vec<&Domain> = domains
        .unwrap_or_default()
        .iter()
        .copied()
        .filter(|d| d.hugepages)
        .collect();
    let wanted_kb: u64 = wanting.iter().filter_map(|d| d.memory_kb).sum();
    let wanting_names: Vec<String> = wanting
        .iter()
        .map(|d| cx.domain_name(d).to_owned())
        .collect();
    let reserved: Vec<_> = pools.iter().filter(|p| p.total > 0).collect();
    let free_kb: u64 = reserved.iter().map(|p| p.free * p.size_kb).sum();
    if reserved.is_empty() {
        if wanting.is_empty() {
            out.ok(
                ID,
                "no hugepages are reserved (optional: backing a VM with 1 GiB or 2 MiB pages cuts TLB misses; reserve them at boot, e.g. hugepagesz=1G hugepages=8 on the kernel command line, and add <memoryBacking><hugepages/> to the domain)",
            );
        } else {
            out.fail(
                ID,
                format!(
                    "{} {} hugepages (<memoryBacking><hugepages/>) but none are reserved, so {} will not start: reserve them at boot (e.g. hugepagesz=1G hugepages={} on the kernel command line) or drop <hugepages/> from the domain",
                    and_list(&wanting_names),
                    if wanting.len() == 1 { "asks for" } else { "ask for" },
                    if wanting.len() == 1 { "it" } else { "they" },
                    wanted_kb.div_ceil(1024 * 1024).max(1)
                ),
            );
        }
        return;
    }
    let described: Vec<String> = reserved
        .iter()
        .map(|p| format!("{} × {} ({} free)", p.total, size_kb(p.size_kb), p.free))
        .collect();
    let summary = format!(
        "hugepages reserved: {}, {} free",
        described.join(", "),
        size_kb(free_kb)
    );
    if wanted_kb > free_kb {
        out.warn(
            ID,
            format!(
                "{summary}; but {} want{} {} of them: reserve more (hugepages= on the kernel command line) or give the VMs less memory",
                and_list(&wanting_names),
                if wanting.len() == 1 { "s" } else { "" },
                size_kb(wanted_kb)
            ),
        );
    } else {
        out.ok(ID, summary);
    }
}

fn pinned(cx: &Context<'_>, domains: Option<&[&Domain]>, out: &mut Findings) {
    const ID: &str = "memory.pinned";
    let Some(scope) = &cx.scope else {
        return;
    };
    let Some(domains) = domains else {
        out.unknown(
            ID,
            format!(
                "how much memory the VMs using {} pin: libvirt's domains (/etc/libvirt/qemu/*.xml) are not known here. A VM with a passed-through device pins all of its memory",
                scope.target
            ),
        );
        return;
    };
    if domains.is_empty() {
        let message = if scope.vms.is_empty() {
            format!("no libvirt domain uses {} yet", scope.target)
        } else {
            format!(
                "profile {} names {}, but /etc/libvirt/qemu has no such domain",
                scope.target,
                and_list(&scope.vms)
            )
        };
        out.ok(ID, message);
        return;
    }
    let parts: Vec<String> = domains
        .iter()
        .map(|d| match d.memory_kb {
            Some(kb) => format!("{} pins {}", cx.domain_name(d), size_kb(kb)),
            None => format!("{} (memory not given)", cx.domain_name(d)),
        })
        .collect();
    // The VMs may not run at once; the largest is what one start needs.
    let largest = domains
        .iter()
        .filter_map(|d| d.memory_kb)
        .max()
        .unwrap_or(0);
    let message = format!(
        "{} while a device is passed through (all of its memory stays resident for DMA)",
        parts.join(", ")
    );
    match cx.host.mem_total_kb {
        Some(total) if largest > total / 10 * 9 => out.warn(
            ID,
            format!(
                "{message}; that is most of the host's {}: give the VM less, or the host will swap or kill processes",
                size_kb(total)
            ),
        ),
        Some(total) => out.ok(ID, format!("{message}, of the host's {}", size_kb(total))),
        None => out.ok(ID, message),
    }
}
