//! vfioctl: the client of vfiod (DESIGN §5).

mod bus;
mod commands;
mod error;
mod hook;
mod model;
mod output;
mod snapshot;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use vfioctl::cli::{Action, Cli};
use vfiod_dbus::Direction;

use crate::bus::Bus;
use crate::commands::moves::MoveOptions;
use crate::commands::{check, moves, show, watch};
use crate::error::{Exit, Failure};
use crate::output::Output;

fn main() -> ExitCode {
    let cli = match Cli::parse_plain(std::env::args_os()) {
        Some(cli) => cli,
        None => match Cli::try_parse() {
            Ok(cli) => cli,
            Err(e) => return usage(&e),
        },
    };
    let out = Output::detect(cli.json);
    outcome(run(cli.action, &out), &out).into()
}

/// The exit status; a failure's reason is shown first.
fn outcome(result: Result<Exit, Failure>, out: &Output) -> Exit {
    result.unwrap_or_else(|failure| {
        out.fail(&failure);
        failure.exit
    })
}

/// clap's message on stderr (help and version on stdout, exit 0); with
/// --json a usage error is also a JSON document on stdout.
fn usage(e: &clap::Error) -> ExitCode {
    // Nothing better to do when the terminal is gone.
    let _ = e.print();
    let code = e.exit_code();
    // args_os: a non-UTF-8 argument is a usage error, not a panic.
    let wants_json = std::env::args_os()
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if code != 0 && wants_json {
        let rendered = e.render().to_string();
        let first = rendered.lines().next().unwrap_or("invalid arguments");
        let message = first.strip_prefix("error: ").unwrap_or(first).to_owned();
        Output::detect(true).error_json(&Failure::new(Exit::Usage, "vfioctl.Usage", message));
    }
    ExitCode::from(u8::try_from(code).unwrap_or(Exit::Usage as u8))
}

fn run(action: Action, out: &Output) -> Result<Exit, Failure> {
    match action {
        // Neither needs the bus; the hook only once it knows it has work.
        Action::Snapshot(args) => snapshot::run(&args.root, out),
        Action::LibvirtHook(args) => {
            let Some(direction) = hook::direction(&args.operation, &args.suboperation) else {
                return Ok(Exit::Done);
            };
            match hook::prepare_work(&args.domain, direction, args.config, out)? {
                Some(work) => block_on(async { exit_now(hook::execute(&work, out).await, out) }),
                None => Ok(Exit::Done),
            }
        }
        Action::List => block_on(async { show::list(&Bus::connect().await?, out).await }),
        Action::Status { target } => {
            block_on(async { show::status(&Bus::connect().await?, out, target.as_deref()).await })
        }
        Action::Bind(args) => {
            let options = MoveOptions {
                force: args.force,
                vm: args.vm,
                timeout_ms: args.timeout_ms,
            };
            block_on(async {
                let bus = Bus::connect_for_moves().await?;
                let result = moves::run(&bus, out, Direction::Bind, &args.targets, &options).await;
                exit_now(result, out)
            })
        }
        Action::Release(args) => {
            let options = MoveOptions {
                force: false,
                vm: args.vm,
                timeout_ms: args.timeout_ms,
            };
            block_on(async {
                let bus = Bus::connect_for_moves().await?;
                let result =
                    moves::run(&bus, out, Direction::Release, &args.targets, &options).await;
                exit_now(result, out)
            })
        }
        Action::Check { target } => {
            block_on(async { check::run(&Bus::connect().await?, out, target.as_deref()).await })
        }
        Action::Watch => block_on(async { watch::run(&Bus::connect().await?, out).await }),
    }
}

/// Ends a move's process once its outcome is written, without taking
/// down the connection and the runtime: that only costs time, and the
/// kernel closes the socket anyway.
fn exit_now(result: Result<Exit, Failure>, out: &Output) -> Result<Exit, Failure> {
    let exit = outcome(result, out);
    // Nothing better to do when stdout is gone; stderr is unbuffered.
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(exit as u8))
}

/// One thread is enough for a client that waits on one socket.
fn block_on<F: Future<Output = Result<Exit, Failure>>>(future: F) -> Result<Exit, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::local("Runtime", format!("cannot start the async runtime: {e}")))?
        .block_on(future)
}
