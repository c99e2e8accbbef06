//! The state dir (DESIGN §5): where vfiod keeps the journal and the
//! ledger, which decide what it writes to the kernel after a restart. Only
//! vfiod's own user may write there, so it is vfiod's own directory, mode
//! 0700, reached without a symbolic link; anything else is refused, naming
//! the path and what is wrong with it.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use tracing::info;

/// Why a state dir is refused.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "state dir {path} is a symbolic link (to {target}): give vfiod a real directory with --state-dir"
    )]
    Symlink { path: PathBuf, target: PathBuf },
    #[error("state dir {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "state dir {path} belongs to {owner} (uid {owner_uid}), not to vfiod's user (uid {uid}): \
another user could rewrite what vfiod does after a restart; remove it or give vfiod another \
with --state-dir"
    )]
    OwnedByAnother {
        path: PathBuf,
        owner: String,
        owner_uid: u32,
        uid: u32,
    },
    #[error(
        "no state dir: XDG_RUNTIME_DIR is not set, and vfiod keeps its state only in a directory \
that outlives it and that no other user can write; give one with --state-dir DIR"
    )]
    NoRuntimeDir,
    #[error("state dir {path}: cannot {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The state dir when none is given: `/run/vfiod` as root,
/// `$XDG_RUNTIME_DIR/vfiod` otherwise. Without `XDG_RUNTIME_DIR` there is
/// no default: a fresh private directory at every start would forget the
/// journal and the ledger across a restart, which is what they are for.
pub fn default_state_dir(
    root: bool,
    xdg_runtime_dir: Option<std::ffi::OsString>,
) -> Result<PathBuf, StateDirError> {
    if root {
        return Ok(PathBuf::from("/run/vfiod"));
    }
    match xdg_runtime_dir {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir).join("vfiod")),
        _ => Err(StateDirError::NoRuntimeDir),
    }
}

/// Creates `path` (mode 0700) if it is missing, and checks that it is a
/// directory of this process's user, not reached through a symbolic link;
/// one that others may read or write is made 0700.
pub fn prepare(path: &Path) -> Result<(), StateDirError> {
    let io = |op: &'static str| {
        move |source: io::Error| StateDirError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("create its parent"))?;
    }
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create it")(e)),
    }
    // O_NOFOLLOW: the checks below are of the directory itself, never of
    // where a link put in its place leads.
    let dir = match OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY).bits())
        .open(path)
    {
        Ok(dir) => dir,
        Err(e) => return Err(refusal_of(path).unwrap_or_else(|| io("open it")(e))),
    };
    let meta = dir.metadata().map_err(io("read its owner"))?;
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(StateDirError::OwnedByAnother {
            path: path.to_path_buf(),
            owner: user_name(meta.uid()),
            owner_uid: meta.uid(),
            uid,
        });
    }
    if meta.mode() & 0o077 != 0 {
        dir.set_permissions(Permissions::from_mode(0o700))
            .map_err(io("make it private (chmod 0700)"))?;
        info!(state_dir = %path.display(), was = format!("{:o}", meta.mode() & 0o777), "state dir made private (0700)");
    }
    Ok(())
}

/// Why `path` could not be opened as a directory, when it is not one.
fn refusal_of(path: &Path) -> Option<StateDirError> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).unwrap_or_default();
        return Some(StateDirError::Symlink {
            path: path.to_path_buf(),
            target,
        });
    }
    (!meta.is_dir()).then(|| StateDirError::NotADirectory {
        path: path.to_path_buf(),
    })
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        nix::unistd::mkdtemp(&std::env::temp_dir().join("vfiod-statedir-XXXXXX")).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn a_new_state_dir_is_private_and_an_open_one_is_made_so() {
        let top = temp_dir();
        let dir = top.join("run").join("vfiod");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, Permissions::from_mode(0o777)).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn a_state_dir_reached_through_a_symlink_is_refused() {
        let top = temp_dir();
        let real = top.join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, Permissions::from_mode(0o755)).unwrap();
        let link = top.join("vfiod");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = prepare(&link).unwrap_err();
        assert!(matches!(err, StateDirError::Symlink { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&link.display().to_string()), "{text}");
        assert!(text.contains(&real.display().to_string()), "{text}");
        // Nothing was done to where the link leads.
        assert_eq!(mode(&real), 0o755);
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn a_state_dir_of_another_user_is_refused_naming_its_owner() {
        let top = temp_dir();
        let theirs = top.join("vfiod");
        std::fs::create_dir(&theirs).unwrap();
        let me = nix::unistd::geteuid();
        // As root, a directory given to `nobody`; otherwise one of root's.
        let (theirs, owner) = if me.is_root() {
            let nobody = nix::unistd::Uid::from_raw(65534);
            nix::unistd::chown(&theirs, Some(nobody), None).unwrap();
            (theirs, 65534)
        } else {
            (PathBuf::from("/"), 0)
        };
        let err = prepare(&theirs).unwrap_err();
        let StateDirError::OwnedByAnother { owner_uid, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(*owner_uid, owner);
        let text = err.to_string();
        assert!(text.contains(&theirs.display().to_string()), "{text}");
        assert!(text.contains(&user_name(owner)), "{text}");
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn a_file_in_place_of_the_state_dir_is_refused() {
        let top = temp_dir();
        let file = top.join("vfiod");
        std::fs::write(&file, "").unwrap();
        let err = prepare(&file).unwrap_err();
        assert!(matches!(err, StateDirError::NotADirectory { .. }), "{err}");
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn without_xdg_runtime_dir_a_normal_user_has_no_default() {
        assert_eq!(
            default_state_dir(true, None).unwrap(),
            Path::new("/run/vfiod")
        );
        assert_eq!(
            default_state_dir(false, Some("/run/user/1000".into())).unwrap(),
            Path::new("/run/user/1000/vfiod")
        );
        for unset in [None, Some("".into())] {
            let err = default_state_dir(false, unset).unwrap_err();
            assert!(err.to_string().contains("--state-dir"), "{err}");
        }
    }
}
