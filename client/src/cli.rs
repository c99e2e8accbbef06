//! The clap definition of `vfioctl` (DESIGN §5).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use vfiod_dbus::names::MAX_TARGET_LEN;

const EXIT_STATUS: &str = "\
Exit status:
  0  done
  1  refused or failed (the reason is on stderr)
  2  usage error, or an invalid domain XML for libvirt-hook
  3  vfiod unreachable (no system bus, or org.vfiod1 not on it)
  4  access denied

The system bus is the one DBUS_SYSTEM_BUS_ADDRESS names, if set. A read
that vfiod does not answer within 25 s (VFIOCTL_READ_TIMEOUT_MS) exits 3.";

/// The parsed command line.
#[derive(Debug, Parser)]
#[command(
    name = "vfioctl",
    version,
    about = "Move PCI devices between their host drivers and vfio-pci through vfiod",
    long_about = "Move PCI devices between their host drivers and vfio-pci through vfiod.\n\n\
        vfioctl asks the vfiod daemon, over the D-Bus system bus, to bind devices to \
        vfio-pci for a virtual machine and to give them back to their host drivers \
        afterwards. A TARGET is a profile name from /etc/vfiod/vfiod.toml or a PCI \
        address (0000:01:00.0 or 01:00.0).",
    after_long_help = EXIT_STATUS,
    propagate_version = true
)]
pub struct Cli {
    /// Print one JSON document instead of text (watch: one JSON object per line)
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// List every device and profile vfiod knows, one line each
    List,
    /// Summarize the host, or show one profile or device in detail
    Status {
        /// A profile name or a PCI address
        #[arg(value_parser = parse_target)]
        target: Option<String>,
    },
    /// Bind devices to vfio-pci, one target after another
    Bind(BindArgs),
    /// Give devices back to their host drivers, one target after another
    Release(ReleaseArgs),
    /// Check the host (or one target) for what passthrough needs
    ///
    /// Prints every finding as ok, warn or fail; the exit status is 1 when
    /// any finding is a failure.
    Check {
        /// A profile name or a PCI address; the whole host when absent
        #[arg(value_parser = parse_target)]
        target: Option<String>,
    },
    /// Print every change of vfiod's devices and profiles as it happens
    ///
    /// Runs until interrupted.
    Watch,
    /// Print this host as a machine file for vfiod --machine
    ///
    /// Reads sysfs and /proc directly; vfiod need not run.
    Snapshot(SnapshotArgs),
    /// Entry point of the libvirt qemu hook (domain XML on stdin)
    ///
    /// On "prepare begin", binds the profiles whose `vms` name DOMAIN and the
    /// domain's <hostdev type='pci' managed='no'> devices; on "release end",
    /// releases them. Every other operation exits 0 at once.
    #[command(name = "libvirt-hook")]
    LibvirtHook(HookArgs),
}

#[derive(Debug, Args)]
pub struct BindArgs {
    /// Profile names or PCI addresses, moved in this order
    #[arg(required = true, value_parser = parse_target)]
    pub targets: Vec<String>,
    /// Override holders of device nodes, the kernel console and USB input devices
    #[arg(long)]
    pub force: bool,
    /// The virtual machine that takes the devices (their owner)
    #[arg(long, value_name = "NAME", value_parser = parse_vm)]
    pub vm: Option<String>,
    /// Bound on each whole move, in milliseconds
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// Profile names or PCI addresses, moved in this order
    #[arg(required = true, value_parser = parse_target)]
    pub targets: Vec<String>,
    /// Release only what this virtual machine owns
    #[arg(long, value_name = "NAME", value_parser = parse_vm)]
    pub vm: Option<String>,
    /// Bound on each whole move, in milliseconds
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u32>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Read sysfs and /proc under DIR instead of / (for tests)
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    pub root: PathBuf,
}

#[derive(Debug, Args)]
pub struct HookArgs {
    /// The libvirt domain name
    pub domain: String,
    /// The hook operation (prepare, start, started, stopped, release, ...)
    pub operation: String,
    /// The sub-operation (begin, end, ...)
    pub suboperation: String,
    /// libvirt's extra argument (usually "-")
    pub extra: Option<String>,
    /// The vfiod config file [default: $VFIOD_CONFIG, else /etc/vfiod/vfiod.toml]
    #[arg(long, value_name = "FILE", hide = true)]
    pub config: Option<PathBuf>,
}

/// The whole command, for man pages, completions and tests.
pub fn command() -> clap::Command {
    Cli::command()
}

impl Cli {
    /// The plain command lines of the move paths (`bind`, `release`,
    /// `libvirt-hook`), parsed without clap: building clap's command is most
    /// of a move's own CPU time on a slow machine. Anything else (help, an
    /// `--option=value`, a value that looks like an option, a repeated
    /// option, anything clap would refuse) is `None`, for clap to parse.
    /// A test checks that every `Some` is what clap makes of the same line.
    pub fn parse_plain<I, T>(args: I) -> Option<Cli>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args: Vec<String> = args
            .into_iter()
            .skip(1)
            .map(|a| a.into().into_string().ok())
            .collect::<Option<_>>()?;
        let mut args = args.iter().map(String::as_str);
        let mut json = false;
        let command = loop {
            match args.next()? {
                "--json" => set_flag(&mut json)?,
                word => break word,
            }
        };
        let (bind, hook) = match command {
            "bind" => (true, false),
            "release" => (false, false),
            "libvirt-hook" => (false, true),
            _ => return None,
        };
        let mut words = Vec::new();
        let (mut force, mut vm, mut timeout_ms, mut config) = (false, None, None, None);
        while let Some(arg) = args.next() {
            match arg {
                "--json" => set_flag(&mut json)?,
                "--force" if bind => set_flag(&mut force)?,
                "--vm" if !hook => set_value(&mut vm, parse_vm(plain_value(args.next())?).ok()?)?,
                "--timeout-ms" if !hook => {
                    let ms = plain_value(args.next())?;
                    if !ms.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    set_value(&mut timeout_ms, ms.parse::<u32>().ok()?)?;
                }
                "--config" if hook => {
                    set_value(&mut config, PathBuf::from(plain_value(args.next())?))?
                }
                // libvirt's EXTRA is usually "-", which clap takes as a value.
                "-" if hook => words.push(arg),
                _ if arg.is_empty() || arg.starts_with('-') => return None,
                _ => words.push(arg),
            }
        }
        let action = if hook {
            let [domain, operation, suboperation, extra @ ..] = words.as_slice() else {
                return None;
            };
            if extra.len() > 1 {
                return None;
            }
            Action::LibvirtHook(HookArgs {
                domain: (*domain).to_owned(),
                operation: (*operation).to_owned(),
                suboperation: (*suboperation).to_owned(),
                extra: extra.first().map(|e| (*e).to_owned()),
                config,
            })
        } else {
            if words.is_empty() {
                return None;
            }
            let targets = words
                .iter()
                .map(|t| parse_target(t).ok())
                .collect::<Option<Vec<_>>>()?;
            if bind {
                Action::Bind(BindArgs {
                    targets,
                    force,
                    vm,
                    timeout_ms,
                })
            } else {
                Action::Release(ReleaseArgs {
                    targets,
                    vm,
                    timeout_ms,
                })
            }
        };
        Some(Cli { json, action })
    }
}

/// A flag given once; a second time is clap's to judge.
fn set_flag(flag: &mut bool) -> Option<()> {
    (!*flag).then(|| *flag = true)
}

fn set_value<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    slot.is_none().then(|| *slot = Some(value))
}

/// An option's value in the next word, unless it could be taken for an option.
fn plain_value(word: Option<&str>) -> Option<&str> {
    word.filter(|w| !w.is_empty() && !w.starts_with('-'))
}

/// A target as the daemon accepts it (DESIGN §4); refusing the obviously
/// malformed here makes it a usage error (exit 2) instead of a bus error.
fn parse_target(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a target cannot be empty".into());
    }
    if s.len() > MAX_TARGET_LEN {
        return Err(format!("a target is at most {MAX_TARGET_LEN} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err("a target cannot contain control characters".into());
    }
    Ok(s.to_owned())
}

fn parse_vm(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a VM name cannot be empty".into());
    }
    if s.chars().any(char::is_control) {
        return Err("a VM name cannot contain control characters".into());
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vfioctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn parses_every_command() {
        assert!(matches!(parse(&["list"]).unwrap().action, Action::List));
        let cli = parse(&["--json", "status", "rx580"]).unwrap();
        assert!(cli.json);
        assert!(matches!(cli.action, Action::Status { target: Some(t) } if t == "rx580"));
        // --json is global: it may follow the command too.
        assert!(parse(&["check", "--json"]).unwrap().json);

        let Action::Bind(bind) = parse(&["bind", "rx580", "01:00.0", "--force", "--vm", "win10"])
            .unwrap()
            .action
        else {
            panic!("not bind");
        };
        assert_eq!(bind.targets, ["rx580", "01:00.0"]);
        assert!(bind.force);
        assert_eq!(bind.vm.as_deref(), Some("win10"));
        assert_eq!(bind.timeout_ms, None);

        let Action::Release(release) = parse(&["release", "usb3", "--timeout-ms", "5000"])
            .unwrap()
            .action
        else {
            panic!("not release");
        };
        assert_eq!(release.targets, ["usb3"]);
        assert_eq!(release.timeout_ms, Some(5000));

        let Action::Snapshot(snap) = parse(&["snapshot"]).unwrap().action else {
            panic!("not snapshot");
        };
        assert_eq!(snap.root, PathBuf::from("/"));

        let Action::LibvirtHook(hook) = parse(&["libvirt-hook", "win10", "prepare", "begin", "-"])
            .unwrap()
            .action
        else {
            panic!("not libvirt-hook");
        };
        assert_eq!(
            (
                hook.domain.as_str(),
                hook.operation.as_str(),
                hook.suboperation.as_str()
            ),
            ("win10", "prepare", "begin")
        );
        assert_eq!(hook.extra.as_deref(), Some("-"));
        assert!(matches!(parse(&["watch"]).unwrap().action, Action::Watch));
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &[][..],
            &["frobnicate"],
            &["list", "--frobnicate"],
            &["bind"],
            &["bind", "rx580", "--force=yes"],
            &["bind", ""],
            &["bind", "rx580", "--vm", ""],
            &["release", "rx580", "--force"],
            &["release", "rx580", "--timeout-ms", "soon"],
            &["status", "a", "b"],
            &["libvirt-hook", "win10"],
            &["--jsn", "list"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} parsed"));
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
        let long = "x".repeat(MAX_TARGET_LEN + 1);
        assert_eq!(parse(&["bind", &long]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn help_and_version_exit_0() {
        for args in [&["--help"][..], &["bind", "--help"], &["--version"]] {
            let err = parse(args).unwrap_err();
            assert!(matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ));
            assert_eq!(err.exit_code(), 0);
        }
    }

    /// Every line the plain parser takes, clap parses the same way: all
    /// lines of up to four words from a vocabulary, and a sample of longer ones.
    #[test]
    fn plain_parsing_agrees_with_clap() {
        const WORDS: &[&str] = &[
            "--json",
            "bind",
            "release",
            "libvirt-hook",
            "gpu",
            "01:00.0",
            "--force",
            "--vm",
            "win10",
            "--timeout-ms",
            "5000",
            "-",
            "--config",
            "/x.toml",
            "",
            "--",
            "-x",
            "help",
            "--help",
            "4294967296",
            "+5",
            "007",
            "a\u{7}",
            "--vm=win10",
            "status",
        ];
        let mut taken = 0;
        let mut check = |line: &[&str]| {
            let args = std::iter::once("vfioctl").chain(line.iter().copied());
            let Some(plain) = Cli::parse_plain(args.clone()) else {
                return;
            };
            taken += 1;
            let clap = Cli::try_parse_from(args)
                .unwrap_or_else(|e| panic!("{line:?}: plain parsed, clap refused: {e}"));
            assert_eq!(format!("{plain:?}"), format!("{clap:?}"), "{line:?}");
        };
        let n = WORDS.len();
        for len in 0..=4u32 {
            for mut i in 0..n.pow(len) {
                let line: Vec<&str> = (0..len)
                    .map(|_| {
                        let word = WORDS[i % n];
                        i /= n;
                        word
                    })
                    .collect();
                check(&line);
            }
        }
        // Longer lines start with a command, or the sample would hardly
        // ever hold one: a deterministic sample.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |bound: usize| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize % bound
        };
        for _ in 0..100_000 {
            let len = 4 + next(5);
            let mut line: Vec<&str> = (0..len).map(|_| WORDS[next(n)]).collect();
            line[next(2)] = ["bind", "release", "libvirt-hook"][next(3)];
            check(&line);
        }
        for line in [
            &["bind", "gpu"][..],
            &["release", "gpu"],
            &[
                "--json", "bind", "gpu", "01:00.0", "--force", "--vm", "win10",
            ],
            &[
                "release",
                "gpu",
                "--vm",
                "win10",
                "--timeout-ms",
                "5000",
                "--json",
            ],
            &["libvirt-hook", "win10", "prepare", "begin", "-"],
            &[
                "libvirt-hook",
                "--config",
                "/x.toml",
                "win10",
                "release",
                "end",
                "-",
            ],
        ] {
            assert!(
                Cli::parse_plain(std::iter::once("vfioctl").chain(line.iter().copied())).is_some(),
                "{line:?}"
            );
        }
        assert!(taken > 1000, "only {taken} lines taken");
    }

    #[test]
    fn hidden_options_stay_out_of_help_but_parse() {
        let help = command()
            .find_subcommand_mut("snapshot")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(!help.contains("--root"), "{help}");
        let Action::Snapshot(snap) = parse(&["snapshot", "--root", "/tmp/x"]).unwrap().action
        else {
            panic!("not snapshot");
        };
        assert_eq!(snap.root, PathBuf::from("/tmp/x"));
        let Action::LibvirtHook(hook) = parse(&[
            "libvirt-hook",
            "--config",
            "/x.toml",
            "vm",
            "release",
            "end",
            "-",
        ])
        .unwrap()
        .action
        else {
            panic!("not libvirt-hook");
        };
        assert_eq!(hook.config, Some(PathBuf::from("/x.toml")));
    }
}
