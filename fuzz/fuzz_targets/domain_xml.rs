//! libvirt domain XML as the hook reads it from stdin: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else { return };
    let _ = vfioctl::domain::parse(xml);
});
