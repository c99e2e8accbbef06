//! Files under a root directory, seen the way a process chrooted into it
//! would see them: absolute link targets start again at the root and `..`
//! never climbs above it. Sysfs is a forest of relative links; resolving
//! them ourselves keeps a fixture tree from leading a read, or worse a
//! write, out into the machine's real /sys. Under `/` itself there is
//! nothing to escape to, and the kernel resolves in a few syscalls what
//! the walk below resolves in one or two per component.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::{KernelError, KernelResult};

/// Linux gives up after 40 links too (ELOOP).
const MAX_LINKS: usize = 40;

#[derive(Debug, Clone)]
pub struct Rooted {
    root: PathBuf,
    /// The root is `/`: the kernel's own resolution is the chrooted one.
    is_host_root: bool,
}

impl Rooted {
    pub fn new(root: PathBuf) -> Self {
        let is_host_root = root == Path::new("/");
        Rooted { root, is_host_root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root is the machine's own `/`.
    pub fn is_host_root(&self) -> bool {
        self.is_host_root
    }

    /// Where a root-relative path is on this machine. A leading `/` is
    /// ignored so that `/dev/sda2` means `ROOT/dev/sda2`.
    pub fn host_path(&self, rel: &Path) -> PathBuf {
        self.root.join(rel.strip_prefix("/").unwrap_or(rel))
    }

    /// `rel` with every link followed, as a root-relative path free of
    /// links. Fails like `open` would (NotFound for a missing component).
    pub fn resolve(&self, rel: &Path) -> io::Result<PathBuf> {
        self.resolve_in(Path::new(""), rel)
    }

    /// [`Rooted::resolve`] of `base/rel`, where `base` is resolved already:
    /// resolving `sys/bus/pci/devices` once spares its four components
    /// a stat for every device.
    pub fn resolve_in(&self, base: &Path, rel: &Path) -> io::Result<PathBuf> {
        if self.is_host_root {
            return resolve_by_kernel(&self.root.join(base).join(rel));
        }
        self.resolve_by_walk(base, rel)
    }

    fn resolve_by_walk(&self, base: &Path, rel: &Path) -> io::Result<PathBuf> {
        // Components still to walk, the next one last.
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, rel);
        let mut resolved = base.to_path_buf();
        let mut links_followed = 0;
        while let Some(component) = pending.pop() {
            if component == "." {
                continue;
            }
            if component == ".." {
                resolved.pop();
                continue;
            }
            let candidate = resolved.join(&component);
            let host = self.root.join(&candidate);
            if !fs::symlink_metadata(&host)?.file_type().is_symlink() {
                resolved = candidate;
                continue;
            }
            links_followed += 1;
            if links_followed > MAX_LINKS {
                return Err(io::Error::from_raw_os_error(nix::libc::ELOOP));
            }
            let target = fs::read_link(&host)?;
            if target.has_root() {
                resolved.clear();
            }
            push_components(&mut pending, &target);
        }
        Ok(resolved)
    }

    /// [`Rooted::resolve`], with `None` when `rel` is absent or a dangling link.
    pub fn resolve_optional(&self, rel: &Path) -> KernelResult<Option<PathBuf>> {
        self.resolve_optional_in(Path::new(""), rel)
    }

    /// [`Rooted::resolve_in`], with `None` when absent or a dangling link.
    pub fn resolve_optional_in(&self, base: &Path, rel: &Path) -> KernelResult<Option<PathBuf>> {
        match self.resolve_in(base, rel) {
            Ok(resolved) => Ok(Some(resolved)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(self.io_error("resolve", &base.join(rel), err)),
        }
    }

    /// True when `rel` exists (a dangling link does not).
    pub fn exists(&self, rel: &Path) -> bool {
        if self.is_host_root {
            return fs::metadata(self.host_path(rel)).is_ok();
        }
        self.resolve(rel).is_ok()
    }

    /// A small text file (a sysfs attribute: a page at most), whole;
    /// `None` when it does not exist. `rel` is taken as it is, links and
    /// all: it should lie in a directory [`Rooted::resolve`] returned.
    pub fn read_optional(&self, rel: &Path) -> KernelResult<Option<String>> {
        match read_small(&self.host_path(rel)) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(self.io_error("read", rel, err)),
        }
    }

    /// A file of any size after resolving `rel`, for files outside sysfs
    /// reached through links (`/lib` → `usr/lib`, `proc/self`); `None`
    /// when it does not exist.
    pub fn read_resolved_optional(&self, rel: &Path) -> KernelResult<Option<String>> {
        let Some(resolved) = self.resolve_optional(rel)? else {
            return Ok(None);
        };
        match fs::read(self.root.join(&resolved)) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(self.io_error("read", rel, err)),
        }
    }

    pub fn read_resolved(&self, rel: &Path) -> KernelResult<String> {
        self.read_resolved_optional(rel)?
            .ok_or_else(|| self.io_error("read", rel, io::ErrorKind::NotFound.into()))
    }

    pub fn read(&self, rel: &Path) -> KernelResult<String> {
        self.read_optional(rel)?
            .ok_or_else(|| self.io_error("read", rel, io::ErrorKind::NotFound.into()))
    }

    /// The last component of a link's target (`driver` → `amdgpu`);
    /// `None` when there is no such link.
    pub fn link_name(&self, rel: &Path) -> KernelResult<Option<String>> {
        let target = match fs::read_link(self.host_path(rel)) {
            Ok(target) => target,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(self.io_error("readlink", rel, err)),
        };
        let name = target
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| {
                self.malformed(
                    rel,
                    format!("link to {} has no usable name", target.display()),
                )
            })?;
        Ok(Some(name.to_owned()))
    }

    /// Names in a directory, sorted; an absent directory has none.
    pub fn list_optional(&self, rel: &Path) -> KernelResult<Vec<OsString>> {
        let entries = match fs::read_dir(self.host_path(rel)) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(self.io_error("list", rel, err)),
        };
        let mut names = entries
            .map(|entry| entry.map(|entry| entry.file_name()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|err| self.io_error("list", rel, err))?;
        names.sort();
        Ok(names)
    }

    /// Where a write to `rel` must go: resolved first, so a link in a
    /// fixture cannot aim the write outside the root. Resolving is all
    /// this crate does; the daemon writes.
    pub fn write_target(&self, op: &'static str, rel: &Path) -> KernelResult<PathBuf> {
        if self.is_host_root {
            return Ok(self.host_path(rel));
        }
        let resolved = self
            .resolve(rel)
            .map_err(|err| self.io_error(op, rel, err))?;
        Ok(self.root.join(resolved))
    }

    pub fn io_error(&self, op: &'static str, rel: &Path, err: io::Error) -> KernelError {
        KernelError::io(op, self.host_path(rel).display().to_string(), err)
    }

    pub fn malformed(&self, rel: &Path, reason: impl Into<String>) -> KernelError {
        KernelError::Malformed {
            path: self.host_path(rel).display().to_string(),
            reason: reason.into(),
        }
    }
}

/// Reads a whole small file with plain read(2)s: `fs::read` first asks
/// for the size (a statx and an lseek), which sysfs can't answer anyway.
/// A read that does not fill the buffer has reached the end: sysfs hands
/// out an attribute (a page at most) whole, and a regular file stops
/// short only at its end.
fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let mut bytes = Vec::with_capacity(128);
    let mut chunk = [0u8; 4096];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(bytes),
            Ok(count) if count < chunk.len() => {
                bytes.extend_from_slice(&chunk[..count]);
                return Ok(bytes);
            }
            Ok(count) => bytes.extend_from_slice(&chunk[..count]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

/// `path` (absolute, on this machine) with every link followed, relative
/// to `/`: the kernel resolves it in an O_PATH open, and the descriptor's
/// link in /proc/self/fd names where it went.
fn resolve_by_kernel(path: &Path) -> io::Result<PathBuf> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH)
        .open(path)?;
    let resolved = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    Ok(resolved
        .strip_prefix("/")
        .map(Path::to_path_buf)
        .unwrap_or(resolved))
}

/// Pushes the components of `path` so that the first is popped first.
fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let start = pending.len();
    for component in path.components() {
        match component {
            Component::Normal(name) => pending.push(name.to_owned()),
            Component::ParentDir => pending.push("..".into()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    pending[start..].reverse();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under `/` the kernel's resolution and the walk must agree: links
    /// relative and absolute, chained, through `..`, dangling.
    #[test]
    fn the_kernel_resolves_under_slash_as_the_walk_does() {
        let template = std::env::temp_dir().join("vfiod-rooted-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).expect("mkdtemp");
        let real = fs::canonicalize(&dir).unwrap();
        fs::create_dir_all(real.join("a/b/c")).unwrap();
        fs::write(real.join("a/b/c/attr"), "1\n").unwrap();
        std::os::unix::fs::symlink("../a/b", real.join("a/up")).unwrap();
        std::os::unix::fs::symlink(real.join("a/b/c"), real.join("abs")).unwrap();
        std::os::unix::fs::symlink("abs", real.join("chain")).unwrap();
        std::os::unix::fs::symlink("nowhere", real.join("dangling")).unwrap();
        let host = Rooted::new(PathBuf::from("/"));
        let rel = real.strip_prefix("/").unwrap();
        for case in ["a/up/c/attr", "abs/attr", "chain/../c/attr", "a/b/../up/c"] {
            let path = rel.join(case);
            let by_kernel = host.resolve(&path).unwrap();
            let by_walk = host.resolve_by_walk(Path::new(""), &path).unwrap();
            assert_eq!(by_kernel, by_walk, "{case}");
            assert!(!by_kernel.has_root(), "{case}: root-relative");
        }
        for missing in ["dangling", "a/none"] {
            let path = rel.join(missing);
            assert_eq!(
                host.resolve(&path).unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
            assert_eq!(
                host.resolve_by_walk(Path::new(""), &path)
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::NotFound
            );
            assert!(!host.exists(&path));
        }
        assert!(host.exists(&rel.join("chain/attr")));
        fs::remove_dir_all(&real).unwrap();
    }
}
