//! vfiod.toml: any bytes are refused with a message naming the file, or
//! accepted; never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vfiod::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            for (name, profile) in &config.profiles {
                assert!(!name.is_empty());
                assert!(!profile.devices.is_empty() || !profile.ids.is_empty());
            }
        }
        Err(e) => assert!(e.to_string().contains("fuzz.toml")),
    }
});
