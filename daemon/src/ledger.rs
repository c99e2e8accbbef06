//! What vfiod remembers about the devices it moved: the host driver each
//! one had before vfio-pci took it (for the way back) and the VM that owns
//! it. Kept in the state dir so a restart forgets nothing.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vfiod_pci::PciAddress;

use crate::state_file::{self, StateFile};

pub const LEDGER_FILE: &str = "ledger.json";

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Records {
    #[serde(default)]
    host_drivers: BTreeMap<PciAddress, String>,
    #[serde(default)]
    owners: BTreeMap<PciAddress, String>,
}

#[derive(Debug)]
pub struct Ledger {
    file: Option<StateFile>,
    records: Records,
}

#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {reason}")]
pub struct LedgerError {
    pub path: PathBuf,
    pub reason: String,
}

impl Ledger {
    /// A ledger kept only in memory (tests, benchmarks).
    pub fn in_memory() -> Ledger {
        Ledger {
            file: None,
            records: Records::default(),
        }
    }

    /// The records alone, kept in memory: what a plan reads.
    pub fn copy_in_memory(&self) -> Ledger {
        Ledger {
            file: None,
            records: self.records.clone(),
        }
    }

    /// Opens `state_dir/ledger.json`; a missing file is an empty ledger, and
    /// so is an unreadable one, set aside as the journal's is: refusing to
    /// start would leave every device where it is with no daemon to move it.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = state_dir.join(LEDGER_FILE);
        let records = match state_file::read_json(&path) {
            Ok(records) => records.unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                state_file::set_aside(&path, "ledger (the devices' host drivers and owners)", &e);
                Records::default()
            }
            Err(e) => {
                return Err(LedgerError {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        Ok(Ledger {
            file: Some(StateFile::new(path)),
            records,
        })
    }

    pub fn host_driver(&self, address: &PciAddress) -> Option<&str> {
        self.records.host_drivers.get(address).map(String::as_str)
    }

    pub fn owner(&self, address: &PciAddress) -> Option<&str> {
        self.records.owners.get(address).map(String::as_str)
    }

    pub fn set_host_driver(
        &mut self,
        address: PciAddress,
        driver: &str,
    ) -> Result<(), LedgerError> {
        if self.host_driver(&address) == Some(driver) {
            return Ok(());
        }
        self.records
            .host_drivers
            .insert(address, driver.to_string());
        self.save()
    }

    pub fn set_owner(
        &mut self,
        address: PciAddress,
        owner: Option<&str>,
    ) -> Result<(), LedgerError> {
        if self.owner(&address) == owner {
            return Ok(());
        }
        match owner {
            Some(vm) => self.records.owners.insert(address, vm.to_string()),
            None => self.records.owners.remove(&address),
        };
        self.save()
    }

    fn save(&mut self) -> Result<(), LedgerError> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let bytes =
            serde_json::to_vec_pretty(&self.records).expect("ledger records always serialize");
        file.replace(&bytes).map_err(|e| LedgerError {
            path: file.path().to_path_buf(),
            reason: e.to_string(),
        })
    }
}
