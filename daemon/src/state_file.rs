//! Small state files that must survive a crash of the process: a reader
//! (vfiod starting again) sees either the old or the new content, never
//! half of it. Nothing is synced: the files must outlive vfiod, which the
//! page cache does, not the kernel. After a kernel crash the devices are
//! back at their boot state, and the journal knows it from the boot id.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

/// Replaces `path` with `bytes`: written to a new file of an unpredictable
/// name beside it (created exclusively, so never through a link or into
/// someone else's file) and renamed over the old one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut template = path.as_os_str().to_owned();
    template.push(".XXXXXX");
    let (fd, tmp) = nix::unistd::mkstemp(Path::new(&template)).map_err(io::Error::from)?;
    let written = File::from(fd)
        .write_all(bytes)
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Reads a state file, not through a symbolic link (one in its place is
/// `InvalidData`, like a file that does not parse); `None` when there is
/// none.
pub fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
    {
        Ok(mut file) => {
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut file, &mut bytes)?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a symbolic link, not a file",
        )),
        Err(e) => Err(e),
    }
}

/// Reads and parses a JSON state file; one that does not parse (truncated
/// too) is `InvalidData`, as [`read`] says of a link.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    read(path)?
        .map(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        })
        .transpose()
}

/// Sets an unreadable state file aside as `NAME.corrupt` for a human, at
/// error level: what it said is lost, and vfiod starts without it.
pub fn set_aside(path: &Path, what: &str, problem: &dyn std::fmt::Display) {
    let aside = path.with_extension("json.corrupt");
    match fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            file = %path.display(),
            moved_to = %aside.display(),
            error = %problem,
            "unreadable {what} set aside; starting without it"
        ),
        Err(e) => tracing::error!(
            file = %path.display(),
            error = %problem,
            "unreadable {what}, and it cannot be set aside as {} ({e}); starting without it",
            aside.display()
        ),
    }
}

/// The kernel copies a write page by page and stops between pages for a
/// fatal signal; a write at offset 0 within the first page is copied
/// whole or not at all.
const ONE_PAGE: usize = 4096;

/// A JSON state file rewritten in place, for the journal's entry before
/// every kernel write: one `pwrite` at offset 0 instead of a new file and
/// a rename each time. The content is padded with spaces (which JSON
/// allows after a document) to the file's length, so a shorter document
/// leaves nothing of the longer one behind it. The first write, one longer
/// than a page, and one after the file was replaced or removed behind
/// vfiod's back go through [`write_atomically`].
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// The file as this process last wrote it.
    written: Option<File>,
}

impl StateFile {
    pub fn new(path: PathBuf) -> StateFile {
        StateFile {
            path,
            written: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn replace(&mut self, document: &[u8]) -> io::Result<()> {
        if let Some(file) = &self.written
            && let Ok(meta) = file.metadata()
            // Still at its path (a rename over it or a removal unlinks it).
            && meta.nlink() > 0
        {
            let mut padded = document.to_vec();
            let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
            if padded.len() < len {
                padded.resize(len, b' ');
            }
            if padded.len() <= ONE_PAGE && file.write_at(&padded, 0)? == padded.len() {
                return Ok(());
            }
        }
        self.written = None;
        write_atomically(&self.path, document)?;
        if document.len() <= ONE_PAGE {
            self.written = Some(
                OpenOptions::new()
                    .write(true)
                    .custom_flags(OFlag::O_NOFOLLOW.bits())
                    .open(&self.path)?,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        nix::unistd::mkdtemp(&std::env::temp_dir().join("vfiod-state-XXXXXX")).unwrap()
    }

    #[test]
    fn every_rewrite_reads_back_as_the_last_document() {
        let dir = temp_dir();
        let path = dir.join("journal.json");
        let mut file = StateFile::new(path.clone());
        let long =
            serde_json::json!({"moves": {"1": {"target": "rx580", "step": "unbind amdgpu"}}});
        let short = serde_json::json!({"moves": {}});
        let huge = serde_json::json!({"moves": "x".repeat(3 * ONE_PAGE)});
        for document in [&long, &short, &long, &huge, &short, &short, &long] {
            file.replace(&serde_json::to_vec(document).unwrap())
                .unwrap();
            let read: serde_json::Value =
                serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            assert_eq!(&read, document);
        }
        // Rewritten in place: no temporary file left, one inode.
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let before = inode(&path);
        file.replace(b"{}").unwrap();
        assert_eq!(inode(&path), before);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_replaced_behind_its_back_is_not_written_through_the_old_one() {
        let dir = temp_dir();
        let path = dir.join("ledger.json");
        let mut file = StateFile::new(path.clone());
        file.replace(b"{\"a\":1}").unwrap();
        // Someone (a test, an admin) puts another file in its place; the
        // next write must reach the path, not the unlinked inode.
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"{}").unwrap();
        file.replace(b"{\"b\":2}").unwrap();
        let read: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(read, serde_json::json!({"b": 2}));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_link_planted_at_a_temporary_name_is_not_written_through() {
        let dir = temp_dir();
        let victim = dir.join("victim");
        fs::write(&victim, "untouched").unwrap();
        let path = dir.join("ledger.json");
        for planted in ["ledger.json.tmp", "ledger.json.partial", "ledger.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.join(planted)).unwrap();
        }
        write_atomically(&path, b"{}").unwrap();
        StateFile::new(path.clone()).replace(b"{\"a\":1}").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"a\":1}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_link_in_place_of_the_journal_is_set_aside_not_followed() {
        let dir = temp_dir();
        let elsewhere = dir.join("elsewhere.json");
        // A journal someone else wrote, with a move to "finish".
        fs::write(
            &elsewhere,
            r#"{"boot_id":"b","next_id":1,"moves":{"0":{"target":"0000:01:00.0","direction":"bind","devices":["0000:01:00.0"]}}}"#,
        )
        .unwrap();
        let path = dir.join(crate::journal::JOURNAL_FILE);
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let (_journal, interrupted) = crate::journal::Journal::open(&dir, "b").unwrap();
        assert!(interrupted.is_empty(), "{interrupted:?}");
        assert!(
            fs::symlink_metadata(dir.join("journal.json.corrupt"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            fs::read_to_string(&elsewhere)
                .unwrap()
                .contains("\"moves\":{\"0\"")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
