//! Small state files that must survive a crash of the process: written to
//! a temporary name and renamed over the old one, so a reader sees either
//! the old or the new content, never half of it.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` atomically. With `sync`, the data and the
/// rename reach the disk before this returns (for a journal); without, they
/// survive the death of the process but not a power cut.
pub fn write_atomically(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let mut file = fs::File::create(tmp)?;
    file.write_all(bytes)?;
    if sync {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(tmp, path)?;
    if sync && let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
