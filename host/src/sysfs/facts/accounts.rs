//! `etc/passwd` and `etc/group`: who QEMU runs as and which groups that
//! gives it.

use super::text;
use crate::facts::Accounts;
use crate::sysfs::rooted::Rooted;

pub(super) fn read(tree: &Rooted) -> Option<Accounts> {
    let passwd = text(tree, "etc/passwd")?;
    let group = text(tree, "etc/group").unwrap_or_default();
    Some(parse(&passwd, &group))
}

/// `name:x:uid:gid:...` and `name:x:gid:member,member`.
pub(super) fn parse(passwd: &str, group: &str) -> Accounts {
    let mut accounts = Accounts::default();
    for line in passwd.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(':').collect();
        if let [name, _, uid, gid, ..] = fields[..]
            && let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse())
        {
            accounts.users.entry(name.to_owned()).or_insert((uid, gid));
        }
    }
    for line in group.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(':').collect();
        if let [name, _, gid, members, ..] = fields[..]
            && let Ok(gid) = gid.parse()
        {
            let members = members
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect();
            accounts
                .groups
                .entry(name.to_owned())
                .or_insert((gid, members));
        }
    }
    accounts
}
