//! Small state files that must survive a crash of the process: written to
//! a temporary name and renamed over the old one, so a reader sees either
//! the old or the new content, never half of it.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` atomically. Nothing is synced: the files
/// must outlive vfiod, which the page cache does, not the kernel. After a
/// kernel crash the devices are back at their boot state, and the journal
/// knows it from the boot id.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let mut file = fs::File::create(tmp)?;
    file.write_all(bytes)?;
    drop(file);
    fs::rename(tmp, path)
}
