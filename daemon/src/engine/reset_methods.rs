//! A profile's `reset_method` (DESIGN §10): written to each of its
//! functions when vfiod starts (while a card is still clean, as
//! vendor-reset needs), on reload and before each bind, and read back.
//!
//! A function the kernel refuses the value for keeps its own methods (a
//! GPU's HDMI audio has no `device_specific` reset when its GPU does);
//! when no function of the profile takes it, or the kernel has no
//! `reset_method` at all, the profile's binds move nothing.

use vfiod_host::sysfs::RESET_METHOD_UNKNOWN;

use super::*;

const VENDOR_RESET_MODULE: &str = "vendor_reset";
const DEVICE_SPECIFIC: &str = "device_specific";

/// What one function made of its profile's reset method.
enum Outcome {
    /// It has the method now (written, or had it already).
    Set,
    /// The kernel does not take it for this function (EINVAL); why, in words.
    Refused(String),
}

impl Engine {
    /// Before a bind: the reset method of each profile the plan touches,
    /// on its functions in the plan. Fails when a profile's cannot be set.
    pub(super) fn set_reset_methods(&self, plan: &Plan, run: &Run) -> Result<(), Failure> {
        let config = self.config();
        for (name, profile) in &config.profiles {
            let Some(methods) = profile.reset_method.as_deref() else {
                continue;
            };
            let functions: Vec<&PciDevice> = plan
                .devices
                .iter()
                .filter(|d| profile.matches(&d.address, &d.id))
                .collect();
            self.set_profile_reset_method(name, methods, &functions, run)?;
        }
        Ok(())
    }

    /// At start and on reload: every profile's, on its functions present.
    /// A profile that fails does not stop the others; each failure is
    /// logged (its binds will be refused) and returned in words.
    pub fn set_configured_reset_methods(&self) -> Vec<String> {
        let config = self.config();
        if config.profiles.values().all(|p| p.reset_method.is_none()) {
            return Vec::new();
        }
        let devices = match self.kernel.devices() {
            Ok(devices) => devices,
            Err(e) => {
                error!(error = %e, "cannot list PCI devices to set their reset_method");
                return vec![format!(
                    "cannot list PCI devices to set their reset_method: {e}"
                )];
            }
        };
        let options = MoveOptions::default();
        let run = Run::unnarrated(&options, None);
        let mut failed = Vec::new();
        for (name, profile) in &config.profiles {
            let Some(methods) = profile.reset_method.as_deref() else {
                continue;
            };
            let functions: Vec<&PciDevice> = devices
                .iter()
                .filter(|d| profile.matches(&d.address, &d.id))
                .collect();
            if let Err(failure) = self.set_profile_reset_method(name, methods, &functions, &run) {
                let why = failure.describe();
                error!(device = failure.device.map(tracing::field::display), step = %failure.step, profile = %name, error = %why, "reset_method not set; binds of this profile will be refused");
                failed.push(why);
            }
        }
        failed
    }

    fn set_profile_reset_method(
        &self,
        profile: &str,
        methods: &str,
        functions: &[&PciDevice],
        run: &Run,
    ) -> Result<(), Failure> {
        let mut refused = Vec::new();
        let mut taken = false;
        for device in functions {
            match self.set_reset_method(device, profile, methods, run)? {
                Outcome::Set => taken = true,
                Outcome::Refused(why) => refused.push((device.address, why)),
            }
        }
        if !taken && let Some((first, _)) = refused.first() {
            let each: Vec<String> = refused
                .iter()
                .map(|(address, why)| format!("{address}: {why}"))
                .collect();
            return Err(Failure {
                device: Some(*first),
                step: format!("set reset_method {methods}"),
                cause: StepFailure::Unexpected(format!(
                    "profile {profile} sets reset_method = \"{methods}\", and the kernel refused it for every function ({}){}",
                    each.join("; "),
                    self.device_specific_hint(methods)
                )),
            });
        }
        for (address, why) in refused {
            warn!(device = %address, profile, methods, why = %why, "this function keeps its own reset methods");
        }
        Ok(())
    }

    /// Writes the function's reset method unless it has it already, and
    /// reads it back.
    fn set_reset_method(
        &self,
        device: &PciDevice,
        profile: &str,
        methods: &str,
        run: &Run,
    ) -> Result<Outcome, Failure> {
        let address = device.address;
        let step = format!("set reset_method {methods}");
        let fail = |why: String| Failure {
            device: Some(address),
            step: step.clone(),
            cause: StepFailure::Unexpected(why),
        };
        let asked = format!("profile {profile} sets reset_method = \"{methods}\"");
        let current = &device.reset_methods;
        if current.iter().any(|m| m == RESET_METHOD_UNKNOWN) {
            return Err(fail(format!(
                "{asked}, but this kernel has no reset_method file (kernels before 5.15 have none): boot 5.15 or newer, or remove the key from the profile"
            )));
        }
        if current.is_empty() {
            return Ok(Outcome::Refused(
                "the kernel has no reset method for it (no reset_method file)".into(),
            ));
        }
        if current.join(" ") == methods {
            return Ok(Outcome::Set);
        }
        (run.progress)(&address, &step);
        info!(device = %address, step = %step, profile, "step");
        let value = methods.to_owned();
        let written = self.kernel_call(Some(address), &step, run, move |k| {
            k.set_reset_method(&address, &value)
        });
        match written {
            Ok(()) => {}
            Err(StepFailure::Kernel(e)) if e.is_invalid_value() => {
                return Ok(Outcome::Refused(format!(
                    "not one of its methods ({}): {e}",
                    current.join(" ")
                )));
            }
            Err(StepFailure::Kernel(e)) => return Err(fail(format!("{asked}: {e}"))),
            Err(cause) => {
                return Err(Failure {
                    device: Some(address),
                    step,
                    cause,
                });
            }
        }
        let now = self
            .read_device(address, run)?
            .map(|d| d.reset_methods.join(" "))
            .unwrap_or_default();
        if now != methods {
            return Err(fail(format!(
                "{asked}, but {address} reads back \"{now}\" after the write"
            )));
        }
        Ok(Outcome::Set)
    }

    /// Why the kernel would refuse `device_specific`, when it is asked for.
    fn device_specific_hint(&self, methods: &str) -> String {
        if !methods.split(' ').any(|m| m == DEVICE_SPECIFIC) {
            return String::new();
        }
        let loaded = self
            .kernel
            .host()
            .ok()
            .and_then(|host| host.loaded_modules)
            .map(|modules| modules.contains(VENDOR_RESET_MODULE));
        match loaded {
            Some(false) => ". device_specific needs vendor-reset, which is not loaded: install it (https://github.com/gnif/vendor-reset) and load it early at boot".into(),
            Some(true) => ". vendor-reset is loaded but has no reset for these devices".into(),
            None => ". device_specific needs vendor-reset loaded for these devices".into(),
        }
    }
}
