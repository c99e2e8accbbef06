// The udev monitor lives in the binary: the library (which vfioctl links
// too) then needs no libudev, and vfioctl can be linked statically.
mod logging;
mod uevents;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use vfiod::bouncer::Bouncer;
use vfiod::cli::{Args, default_state_dir};
use vfiod::early_claim;
use vfiod::engine::Engine;
use vfiod::journal::Journal;
use vfiod::kernel::Kernel;
use vfiod::kernel::Sysfs;
use vfiod::kernel::sim::SimKernel;
use vfiod::ledger::Ledger;
use vfiod::notify;
use vfiod::service::Service;
use vfiod::service::simulator::{SIMULATOR_PATH, SimulatorInterface};
use vfiod::units::SystemdUnits;
use vfiod_config::Config;

/// glibc gives each thread that allocates an arena of its own (up to eight
/// per core) and keeps what each one freed: with a dozen short-lived
/// blocking threads under a flood of calls, that is most of vfiod's RSS.
/// One arena is plenty for a daemon that allocates little.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; called first thing,
    // before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// Four moves and two checks at once, a snapshot read, recovery and the
/// config's reload, with room to spare.
const BLOCKING_THREADS: usize = 10;

fn main() -> ExitCode {
    one_malloc_arena();
    let args = Args::parse();
    if let Some(pid) = args.reload {
        return ask_for_reload(pid, &args);
    }
    logging::init();
    // Blocking work (moves, checks, snapshot reads) is capped by the
    // service's own slots; this caps the threads whatever a caller sends.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!("{message}");
            eprintln!("vfiod: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let state_dir = match args.state_dir.clone() {
        Some(dir) => dir,
        None => default_state_dir().map_err(|e| e.to_string())?,
    };
    vfiod::state_dir::prepare(&state_dir).map_err(|e| e.to_string())?;
    let config = Config::load(&args.config).map_err(|e| e.to_string())?;
    let ledger = Ledger::open(&state_dir).map_err(|e| e.to_string())?;

    // The uevent source exists before the first enumeration, so nothing
    // that happens in between is missed.
    let (kernel, simulated, mut events): (Arc<dyn Kernel>, Option<Arc<SimKernel>>, _) = match &args
        .machine
    {
        Some(machine) => {
            let sim = Arc::new(SimKernel::open(machine, &state_dir).map_err(|e| e.to_string())?);
            let delay = sim.machine().machine.uevent_delay_ms.unwrap_or(0);
            let events =
                uevents::from_simulation(sim.subscribe(), std::time::Duration::from_millis(delay));
            sim.run_coldplug();
            info!(machine = %machine.display(), state_dir = %state_dir.display(), "running on a simulated kernel");
            (sim.clone(), Some(sim), events)
        }
        None => {
            let events =
                uevents::from_udev().map_err(|e| format!("cannot open a udev monitor: {e}"))?;
            (Arc::new(Sysfs::this_machine()), None, events)
        }
    };
    let bouncer = Arc::new(match simulated {
        Some(_) => Bouncer::for_simulation(nix::unistd::getuid().as_raw()),
        None => Bouncer::for_host(),
    });
    let boot_id = kernel
        .boot_id()
        .map_err(|e| format!("cannot read the kernel's boot id: {e}"))?;
    let (journal, interrupted) = Journal::open(&state_dir, &boot_id).map_err(|e| e.to_string())?;
    let engine = Engine::new(kernel, config, ledger, journal);
    // The display manager a handoff stops: the simulated machine's, or
    // systemd's on the system bus.
    match &simulated {
        Some(sim) => engine.set_units(sim.clone()),
        None => engine.set_units(Arc::new(SystemdUnits::new(
            tokio::runtime::Handle::current(),
        ))),
    }
    // A device settled after a late kernel answer changed outside any move:
    // the main loop has the service read it again.
    let (settled_tx, mut settled) = tokio::sync::mpsc::unbounded_channel();
    engine.on_settled(move |address| {
        let _ = settled_tx.send(address);
    });
    if !interrupted.is_empty() || engine.handoffs_recorded() {
        // Before serving: no request may see a half-moved set.
        let recovering = engine.clone();
        let report = tokio::task::spawn_blocking(move || recovering.recover(interrupted))
            .await
            .map_err(|e| format!("recovery failed: {e}"))?;
        info!(devices = %report.join("; "), "recovered the moves a crash interrupted");
    }
    // While the cards are still clean, before any move (vendor-reset's
    // device_specific must be chosen before a card's first use).
    set_reset_methods(&engine).await;
    say_idle_handoffs(&engine).await;
    let claim_root = early_claim::root_for(simulated.is_some(), &state_dir);
    early_claim::keep_in_step(&engine, claim_root).await;
    let service = Service::new(engine.clone(), bouncer.clone());

    let connection = zbus::connection::Builder::system()
        .build()
        .await
        .map_err(|e| format!("cannot connect to the system bus: {e}"))?;
    if let Some(sim) = &simulated {
        connection
            .object_server()
            .at(
                SIMULATOR_PATH,
                SimulatorInterface {
                    kernel: sim.clone(),
                    bouncer: bouncer.clone(),
                },
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    service
        .start(&connection)
        .await
        .map_err(|e| format!("cannot serve org.vfiod1: {e}"))?;
    // Profiles with boot = "vfio" are bound before the name is taken.
    vfiod::boot::bind_boot_profiles(&service, &connection).await;
    service
        .take_name(&connection)
        .await
        .map_err(|e| format!("cannot take the name org.vfiod1: {e}"))?;

    let mut hangup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    warn!("the uevent source closed");
                    std::future::pending::<()>().await;
                    continue;
                };
                // Everything queued so far is handled at once
                // (`rereads_after` says what each event calls for).
                let mut batch = vec![event];
                while let Ok(more) = events.try_recv() {
                    batch.push(more);
                }
                if let Err(e) = service.follow_uevents(&connection, &batch).await {
                    warn!(error = %e, "refresh after a uevent failed");
                }
            }
            Some(address) = settled.recv() => {
                let mut devices = vec![address];
                while let Ok(more) = settled.try_recv() {
                    devices.push(more);
                }
                if let Err(e) = service.reread_devices(&connection, devices).await {
                    warn!(error = %e, "refresh after a device was settled failed");
                }
            }
            _ = hangup.recv() => reload(&args, &state_dir, &engine, &service, &connection).await,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    info!("stopping");
    Ok(())
}

/// `vfiod --reload PID`: the unit's ExecReload. Its exit status and
/// stderr are the reload's verdict, given by the vfiod of PID itself.
fn ask_for_reload(pid: u32, args: &Args) -> ExitCode {
    let state_dir = match args.state_dir.clone().map_or_else(default_state_dir, Ok) {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("vfiod: {e}");
            return ExitCode::FAILURE;
        }
    };
    match vfiod::reload::request(pid, &state_dir, vfiod::reload::VERDICT_TIMEOUT) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfiod: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A reload (SIGHUP): announced to systemd as it begins and ends, and its
/// verdict recorded in the state dir for `vfiod --reload`, which waits for it.
async fn reload(
    args: &Args,
    state_dir: &std::path::Path,
    engine: &Arc<Engine>,
    service: &Arc<Service>,
    connection: &zbus::Connection,
) {
    let began_usec = vfiod::reload::monotonic_usec();
    tell_systemd(&notify::reloading(began_usec));
    let refused = reload_config(args, state_dir, engine, service, connection)
        .await
        .err();
    let status = match &refused {
        None => "configuration reloaded".to_owned(),
        Some(reason) => format!("new configuration refused; keeping the old one: {reason}"),
    };
    let verdict = vfiod::reload::Verdict {
        pid: std::process::id(),
        began_usec,
        refused,
    };
    if let Err(e) = vfiod::reload::record(state_dir, &verdict) {
        error!(error = %e, file = vfiod::reload::VERDICT_FILE, "cannot record the reload's verdict");
    }
    tell_systemd(&notify::ready(&status));
}

/// Which `handoff = true` profiles take no display, said once per load
/// (off the event loop: it reads the kernel).
async fn say_idle_handoffs(engine: &Arc<Engine>) {
    let engine = engine.clone();
    let _ = tokio::task::spawn_blocking(move || engine.say_idle_handoffs()).await;
}

/// Each profile's `reset_method`, on its functions (off the event loop:
/// the writes are bounded kernel calls).
async fn set_reset_methods(engine: &Arc<Engine>) {
    let engine = engine.clone();
    let failed = tokio::task::spawn_blocking(move || engine.set_configured_reset_methods()).await;
    match failed {
        Ok(failed) if failed.is_empty() => {}
        Ok(failed) => warn!(
            failures = failed.len(),
            "some reset methods could not be set"
        ),
        Err(e) => error!(error = %e, "setting reset methods failed"),
    }
}

/// Reads the config again and puts it in force; `Err` is the refusal.
async fn reload_config(
    args: &Args,
    state_dir: &std::path::Path,
    engine: &Arc<Engine>,
    service: &Arc<Service>,
    connection: &zbus::Connection,
) -> Result<(), String> {
    let path = args.config.clone();
    let config = match tokio::task::spawn_blocking(move || Config::load(&path)).await {
        Ok(Ok(config)) => config,
        Ok(Err(e)) => {
            error!(error = %e, "new configuration refused; keeping the old one");
            return Err(e.to_string());
        }
        Err(e) => {
            error!(error = %e, "reloading failed");
            return Err(format!("reloading failed: {e}"));
        }
    };
    info!(config = %args.config.display(), profiles = config.profiles.len(), "configuration reloaded");
    engine.set_config(config);
    set_reset_methods(engine).await;
    say_idle_handoffs(engine).await;
    let claim_root = early_claim::root_for(args.machine.is_some(), state_dir);
    early_claim::keep_in_step(engine, claim_root).await;
    // The new config is in force either way; the bus catches up at the
    // next change.
    if let Err(e) = service.refresh(connection).await {
        warn!(error = %e, "refresh after reload failed");
    }
    Ok(())
}

fn tell_systemd(state: &str) {
    if let Err(e) = notify::notify(state) {
        warn!(error = %e, "cannot notify systemd");
    }
}
