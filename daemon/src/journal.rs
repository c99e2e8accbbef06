//! The move journal: before every kernel write the intended step is in
//! the journal file, so a vfiod that dies mid-move can finish or undo it
//! when it starts again. Entries carry the kernel's boot id: after a reboot the
//! devices are back at their boot state, and nothing is replayed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::info;
use vfiod_dbus::Direction;
use vfiod_pci::PciAddress;

use crate::state_file::StateFile;

pub const JOURNAL_FILE: &str = "journal.json";

/// One move that has begun and not ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveEntry {
    pub target: String,
    pub direction: Direction,
    /// The devices the move changes (those not already where it goes).
    pub devices: Vec<PciAddress>,
    /// The last step announced before its kernel write.
    #[serde(default)]
    pub step: Option<(PciAddress, String)>,
}

/// Where a single-GPU handoff (DESIGN §10) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandoffPhase {
    /// Being taken, before and during the bind.
    Taking,
    /// Taken: the set is bound, the display is away until its release.
    Given,
    /// Being given back, from the release on.
    Returning,
}

/// What a handoff took from the host's display, each part recorded
/// before the write that takes it, so a restart gives back exactly that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The set whose bind took the display.
    pub devices: Vec<PciAddress>,
    pub phase: HandoffPhase,
    /// The display manager's real unit, once vfiod asked it to stop.
    #[serde(default)]
    pub manager: Option<String>,
    /// vtconsoles fbcon was unbound from.
    #[serde(default)]
    pub vtconsoles: Vec<String>,
    /// Framebuffers unbound: (platform device, its driver).
    #[serde(default)]
    pub framebuffers: Vec<(String, String)>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct JournalFile {
    boot_id: String,
    next_id: u64,
    moves: BTreeMap<u64, MoveEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    handoffs: Vec<Handoff>,
}

#[derive(Debug, thiserror::Error)]
#[error("journal {path}: {reason}")]
pub struct JournalError {
    pub path: PathBuf,
    pub reason: String,
}

pub type MoveId = u64;

pub struct Journal {
    /// Locked after `file`, only to write it out.
    state: Option<Mutex<StateFile>>,
    file: Mutex<JournalFile>,
}

impl Journal {
    /// A journal that writes nothing (tests, benchmarks of the engine alone).
    pub fn disabled() -> Journal {
        Journal {
            state: None,
            file: Mutex::default(),
        }
    }

    /// Opens `state_dir/journal.json`. Returns the journal and the moves a
    /// crash interrupted in this boot; those of another boot are dropped.
    pub fn open(
        state_dir: &Path,
        boot_id: &str,
    ) -> Result<(Journal, Vec<(MoveId, MoveEntry)>), JournalError> {
        let path = state_dir.join(JOURNAL_FILE);
        let fail = |reason: String| JournalError {
            path: path.clone(),
            reason,
        };
        let mut file = match crate::state_file::read_json(&path) {
            Ok(file) => file.unwrap_or_default(),
            // Written atomically, so this is damage from outside: keep it
            // for a human, start empty.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                crate::state_file::set_aside(&path, "journal", &e);
                JournalFile::default()
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let interrupted = if file.boot_id == boot_id {
            file.moves.iter().map(|(id, m)| (*id, m.clone())).collect()
        } else {
            if !file.moves.is_empty() {
                info!(
                    moves = file.moves.len(),
                    "journal entries from an earlier boot dropped, not replayed"
                );
            }
            if !file.handoffs.is_empty() {
                info!("handoffs of an earlier boot dropped: the display came back with the boot");
            }
            file.moves.clear();
            file.handoffs.clear();
            file.boot_id = boot_id.to_string();
            Vec::new()
        };
        let journal = Journal {
            state: Some(Mutex::new(StateFile::new(path))),
            file: Mutex::new(file),
        };
        journal.save(&journal.lock())?;
        Ok((journal, interrupted))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JournalFile> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, file: &JournalFile) -> Result<(), JournalError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(file).expect("journal entries always serialize");
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        state.replace(&bytes).map_err(|e| JournalError {
            path: state.path().to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Records that a move begins; nothing has been written yet.
    pub fn begin(
        &self,
        target: &str,
        direction: Direction,
        devices: Vec<PciAddress>,
    ) -> Result<MoveId, JournalError> {
        let mut file = self.lock();
        let id = file.next_id;
        file.next_id += 1;
        file.moves.insert(
            id,
            MoveEntry {
                target: target.to_string(),
                direction,
                devices,
                step: None,
            },
        );
        self.save(&file)?;
        Ok(id)
    }

    /// Records the step about to be written.
    pub fn step(&self, id: MoveId, device: PciAddress, step: &str) -> Result<(), JournalError> {
        let mut file = self.lock();
        if let Some(entry) = file.moves.get_mut(&id) {
            entry.step = Some((device, step.to_string()));
        }
        self.save(&file)
    }

    /// The handoffs recorded and not ended (any phase).
    pub fn handoffs(&self) -> Vec<Handoff> {
        self.lock().handoffs.clone()
    }

    /// Records (or replaces) the handoff of `handoff.devices`.
    pub fn record_handoff(&self, handoff: Handoff) -> Result<(), JournalError> {
        let mut file = self.lock();
        file.handoffs.retain(|h| h.devices != handoff.devices);
        file.handoffs.push(handoff);
        self.save(&file)
    }

    /// Changes the recorded handoff of `devices`, if there is one.
    pub fn update_handoff(
        &self,
        devices: &[PciAddress],
        change: impl FnOnce(&mut Handoff),
    ) -> Result<(), JournalError> {
        let mut file = self.lock();
        match file.handoffs.iter_mut().find(|h| h.devices == devices) {
            Some(handoff) => change(handoff),
            None => return Ok(()),
        }
        self.save(&file)
    }

    /// The display is back (or nothing was taken): the record goes.
    pub fn end_handoff(&self, devices: &[PciAddress]) -> Result<(), JournalError> {
        let mut file = self.lock();
        let before = file.handoffs.len();
        file.handoffs.retain(|h| h.devices != devices);
        if file.handoffs.len() == before {
            return Ok(());
        }
        self.save(&file)
    }

    /// The move is over: done, refused or rolled back.
    pub fn end(&self, id: MoveId) -> Result<(), JournalError> {
        let mut file = self.lock();
        if file.moves.remove(&id).is_some() {
            // No open move refers to an id any more: start again, so the
            // file does not grow with the number of moves ever made.
            if file.moves.is_empty() {
                file.next_id = 0;
            }
            self.save(&file)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file stays the size it was whatever the number of moves: ids
    /// start again once no move is open, so its numbers never grow.
    #[test]
    fn the_journal_does_not_grow_with_the_number_of_moves() {
        let template = std::env::temp_dir().join("vfiod-journal-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).unwrap();
        let (journal, _) = Journal::open(&dir, "boot").unwrap();
        let gpu: PciAddress = "0000:01:00.0".parse().unwrap();
        let one_move = || {
            let id = journal.begin("rx580", Direction::Bind, vec![gpu]).unwrap();
            journal.step(id, gpu, "unbind amdgpu").unwrap();
            journal.end(id).unwrap();
        };
        one_move();
        let size = || std::fs::metadata(dir.join(JOURNAL_FILE)).unwrap().len();
        let first = size();
        for _ in 0..1000 {
            one_move();
        }
        assert_eq!(size(), first);
        // Two moves open at once still get ids of their own.
        let a = journal.begin("rx580", Direction::Bind, vec![gpu]).unwrap();
        let b = journal.begin("usb3", Direction::Bind, vec![gpu]).unwrap();
        assert_ne!(a, b);
        journal.end(a).unwrap();
        let c = journal
            .begin("usb3", Direction::Release, vec![gpu])
            .unwrap();
        assert_ne!(b, c, "an open move's id is never given again");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A handoff's record outlives vfiod in the same boot, changes part by
    /// part, ends; another boot has the display back and drops it.
    #[test]
    fn handoffs_are_kept_in_a_boot_and_dropped_after_a_reboot() {
        let template = std::env::temp_dir().join("vfiod-journal-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).unwrap();
        let gpu: PciAddress = "0000:09:00.0".parse().unwrap();
        let (journal, _) = Journal::open(&dir, "boot").unwrap();
        journal
            .record_handoff(Handoff {
                devices: vec![gpu],
                phase: HandoffPhase::Taking,
                manager: None,
                vtconsoles: Vec::new(),
                framebuffers: Vec::new(),
            })
            .unwrap();
        journal
            .update_handoff(&[gpu], |h| h.manager = Some("sddm.service".into()))
            .unwrap();
        drop(journal);
        let (journal, _) = Journal::open(&dir, "boot").unwrap();
        let kept = journal.handoffs();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].manager.as_deref(), Some("sddm.service"));
        assert_eq!(kept[0].phase, HandoffPhase::Taking);
        drop(journal);
        let (journal, _) = Journal::open(&dir, "another boot").unwrap();
        assert!(journal.handoffs().is_empty());
        journal
            .record_handoff(Handoff {
                devices: vec![gpu],
                phase: HandoffPhase::Given,
                manager: None,
                vtconsoles: vec!["vtcon1".into()],
                framebuffers: Vec::new(),
            })
            .unwrap();
        journal.end_handoff(&[gpu]).unwrap();
        drop(journal);
        let (journal, _) = Journal::open(&dir, "another boot").unwrap();
        assert!(journal.handoffs().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
