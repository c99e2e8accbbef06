//! The `a{sv}` options of Bind and Release, checked strictly: a wrong type
//! or an unknown key is InvalidArgs, never ignored.

use std::collections::HashMap;
use std::time::Duration;

use vfiod_dbus::Error;
use zbus::OwnedVariant;

use crate::plan::MoveOptions;
use vfiod_config::MAX_NAME_LEN;

pub fn parse_move_options(options: &HashMap<String, OwnedVariant>) -> Result<MoveOptions, Error> {
    let mut parsed = MoveOptions::default();
    for (key, value) in options {
        let wrong_type = |want: &str| {
            Error::InvalidArgs(format!(
                "option {key:?} must be {want}, not {}",
                value.value_signature()
            ))
        };
        match key.as_str() {
            "force" => {
                parsed.force = bool::try_from(value).map_err(|_| wrong_type("a boolean (b)"))?
            }
            "vm" => {
                let vm = <&str>::try_from(value).map_err(|_| wrong_type("a string (s)"))?;
                validate_vm_name(vm)?;
                parsed.vm = Some(vm.to_string());
            }
            "timeout_ms" => {
                let ms = u32::try_from(value)
                    .map_err(|_| wrong_type("an unsigned 32-bit integer (u)"))?;
                if ms == 0 {
                    return Err(Error::InvalidArgs(
                        "option \"timeout_ms\" must be more than 0".into(),
                    ));
                }
                parsed.timeout = Some(Duration::from_millis(ms.into()));
            }
            other => {
                return Err(Error::InvalidArgs(format!(
                    "unknown option {:?}; the options are force (b), vm (s) and timeout_ms (u)",
                    other.chars().take(64).collect::<String>()
                )));
            }
        }
    }
    Ok(parsed)
}

pub fn validate_vm_name(vm: &str) -> Result<(), Error> {
    if vm.is_empty() || vm.len() > MAX_NAME_LEN || vm.chars().any(|c| c.is_control() || c == '/') {
        return Err(Error::InvalidArgs(format!(
            "option \"vm\" must be 1-{MAX_NAME_LEN} characters without '/' or control characters"
        )));
    }
    Ok(())
}
