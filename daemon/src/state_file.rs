//! Small state files that must survive a crash of the process: a reader
//! (vfiod starting again) sees either the old or the new content, never
//! half of it. Nothing is synced: the files must outlive vfiod, which the
//! page cache does, not the kernel. After a kernel crash the devices are
//! back at their boot state, and the journal knows it from the boot id.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes`: written to a temporary name and renamed
/// over the old one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let mut file = fs::File::create(tmp)?;
    file.write_all(bytes)?;
    drop(file);
    fs::rename(tmp, path)
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
            self.written = Some(OpenOptions::new().write(true).open(&self.path)?);
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
}
