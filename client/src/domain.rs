//! What the hook needs from a libvirt domain XML: its name and its PCI
//! host devices. Pure parsing, no I/O.

use std::fmt;

use roxmltree::{Document, Node, ParsingOptions};
use vfiod_pci::PciAddress;

/// A libvirt domain XML is a few kilobytes; anything near this is not one.
pub const MAX_XML_BYTES: usize = 16 << 20;
/// Bounds the memory a hostile or broken input can take.
const MAX_NODES: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// `<name>`, when given.
    pub name: Option<String>,
    /// `<devices><hostdev mode='subsystem' type='pci'>`, in document order.
    pub hostdevs: Vec<Hostdev>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hostdev {
    pub address: PciAddress,
    pub managed: Managed,
}

/// The `managed` attribute of a hostdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Managed {
    /// `managed='no'`: the host side is ours to do.
    No,
    /// `managed='yes'`: libvirt detaches and reattaches it itself.
    Yes,
    /// No attribute: not ours either (DESIGN §8: domains using vfiod say 'no').
    Absent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlError(String);

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for XmlError {}

fn fail(message: impl Into<String>) -> XmlError {
    XmlError(message.into())
}

pub fn parse(xml: &str) -> Result<Domain, XmlError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(fail(format!("more than {MAX_XML_BYTES} bytes")));
    }
    let options = ParsingOptions {
        // A DTD is how entity bombs come in; libvirt never writes one.
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..ParsingOptions::default()
    };
    let doc = Document::parse_with_options(xml, options).map_err(|e| fail(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(fail(format!(
            "the root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    let name = child(root, "name").map(|n| n.text().unwrap_or("").trim().to_owned());
    let mut hostdevs = Vec::new();
    for devices in children(root, "devices") {
        for hostdev in children(devices, "hostdev") {
            // libvirt's default mode is 'subsystem'; 'capabilities' is for containers.
            let mode = hostdev.attribute("mode").unwrap_or("subsystem");
            if mode != "subsystem" || hostdev.attribute("type") != Some("pci") {
                continue;
            }
            let managed = match hostdev.attribute("managed") {
                Some("no") => Managed::No,
                Some("yes") => Managed::Yes,
                None => Managed::Absent,
                Some(other) => {
                    return Err(fail(format!(
                        "hostdev managed={other:?}: expected 'yes' or 'no'"
                    )));
                }
            };
            let address = child(hostdev, "source")
                .and_then(|source| child(source, "address"))
                .ok_or_else(|| fail("a PCI hostdev has no <source><address>"))?;
            hostdevs.push(Hostdev {
                address: pci_address(address)?,
                managed,
            });
        }
    }
    Ok(Domain { name, hostdevs })
}

fn children<'a, 'i>(node: Node<'a, 'i>, name: &'static str) -> impl Iterator<Item = Node<'a, 'i>> {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &'static str) -> Option<Node<'a, 'i>> {
    children(node, name).next()
}

/// `<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>`.
fn pci_address(node: Node<'_, '_>) -> Result<PciAddress, XmlError> {
    let field = |name: &str, max: u32, required: bool| -> Result<u32, XmlError> {
        let Some(text) = node.attribute(name) else {
            return if required {
                Err(fail(format!("a PCI hostdev address has no {name}")))
            } else {
                Ok(0)
            };
        };
        number(text).filter(|n| *n <= max).ok_or_else(|| {
            fail(format!(
                "PCI hostdev address {name}={text:?} is not a number up to {max:#x}"
            ))
        })
    };
    Ok(PciAddress::new(
        field("domain", 0xffff, false)? as u16,
        field("bus", 0xff, true)? as u8,
        field("slot", 0x1f, true)? as u8,
        field("function", 0x7, true)? as u8,
    ))
}

/// As libvirt reads these (strtol with base 0): `0x` hex, a leading `0`
/// octal, else decimal.
fn number(text: &str) -> Option<u32> {
    let text = text.trim();
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u32::from_str_radix(hex, 16).ok();
    }
    if text.len() > 1
        && let Some(octal) = text.strip_prefix('0')
    {
        return u32::from_str_radix(octal, 8).ok();
    }
    text.parse().ok()
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// What libvirt 9.0 passes to the hook for a Windows guest with the
    /// RX 580 (managed='no'), a USB card libvirt manages, a USB hostdev
    /// and an emulated NIC with a PCI address of its own.
    pub const WIN10: &str = include_str!("../testdata/win10.xml");

    fn address(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn finds_the_pci_hostdevs_and_how_they_are_managed() {
        let domain = parse(WIN10).unwrap();
        assert_eq!(domain.name.as_deref(), Some("win10"));
        assert_eq!(
            domain.hostdevs,
            [
                Hostdev {
                    address: address("01:00.0"),
                    managed: Managed::No
                },
                Hostdev {
                    address: address("01:00.1"),
                    managed: Managed::No
                },
                Hostdev {
                    address: address("04:00.0"),
                    managed: Managed::Yes
                },
            ]
        );
    }

    #[test]
    fn a_domain_without_hostdevs_has_none() {
        let xml =
            "<domain type='kvm'><name>plain</name><devices><disk type='file'/></devices></domain>";
        assert_eq!(
            parse(xml).unwrap(),
            Domain {
                name: Some("plain".into()),
                hostdevs: vec![]
            }
        );
        // No <devices> at all, no <name>: still a domain.
        assert_eq!(
            parse("<domain/>").unwrap(),
            Domain {
                name: None,
                hostdevs: vec![]
            }
        );
    }

    #[test]
    fn reads_libvirt_number_forms_and_a_missing_managed() {
        let xml = "<domain><name> vm </name><devices>\
            <hostdev type='pci'><source><address bus='10' slot='0x1f' function='07'/></source></hostdev>\
            </devices></domain>";
        let domain = parse(xml).unwrap();
        assert_eq!(domain.name.as_deref(), Some("vm"));
        assert_eq!(
            domain.hostdevs,
            [Hostdev {
                address: PciAddress::new(0, 10, 0x1f, 7),
                managed: Managed::Absent
            }]
        );
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "not xml at all",
            "<domain><name>x</name>",
            "<domain></dom>",
            "<vm><name>x</name></vm>",
            "\u{0}\u{1}binary",
            // Bad addresses and attributes of a PCI hostdev.
            "<domain><devices><hostdev type='pci' managed='no'/></devices></domain>",
            "<domain><devices><hostdev type='pci' managed='maybe'><source><address bus='1' slot='0' function='0'/></source></hostdev></devices></domain>",
            "<domain><devices><hostdev type='pci'><source><address bus='0x100' slot='0' function='0'/></source></hostdev></devices></domain>",
            "<domain><devices><hostdev type='pci'><source><address bus='1' slot='0x20' function='0'/></source></hostdev></devices></domain>",
            "<domain><devices><hostdev type='pci'><source><address bus='1' slot='0' function='8'/></source></hostdev></devices></domain>",
            "<domain><devices><hostdev type='pci'><source><address bus='x' slot='0' function='0'/></source></hostdev></devices></domain>",
            "<domain><devices><hostdev type='pci'><source><address slot='0' function='0'/></source></hostdev></devices></domain>",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn refuses_entity_bombs() {
        let bomb = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<domain><name>&lol3;</name></domain>"#;
        let err = parse(bomb).unwrap_err();
        assert!(err.to_string().contains("DTD"), "{err}");
    }

    #[test]
    fn survives_deep_nesting_and_too_many_nodes() {
        // Deep enough to overflow a recursive parser's stack.
        let depth = 200_000;
        let deep = format!(
            "<domain><devices>{}{}</devices></domain>",
            "<a>".repeat(depth),
            "</a>".repeat(depth)
        );
        assert_eq!(parse(&deep).unwrap().hostdevs, []);
        let unclosed = format!("<domain>{}", "<a>".repeat(depth));
        assert!(parse(&unclosed).is_err());
        let wide = format!("<domain>{}</domain>", "<a/>".repeat(MAX_NODES as usize + 1));
        assert!(parse(&wide).is_err());
    }
}
