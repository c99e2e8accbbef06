//! Machine files: never a panic; what loads writes back to a file that
//! loads to the same machine.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vfiod_pci::machine::MachineFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match MachineFile::parse(text, Path::new("fuzz.toml")) {
        Ok(machine) => {
            let again = MachineFile::parse(&machine.to_toml(), Path::new("again.toml"))
                .expect("a machine file written by to_toml loads");
            assert_eq!(again, machine);
        }
        Err(e) => assert!(e.to_string().contains("fuzz.toml")),
    }
});
