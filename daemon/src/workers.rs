//! Threads for kernel calls, which may never return (an unbind waiting
//! for a holder). A thread whose call returned waits a while for the next
//! one instead of ending: a move makes half a dozen calls in a row, and
//! starting a thread for each costs more than most of the writes.

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long an idle thread waits for work before it ends; an idle daemon
/// keeps none.
const IDLE_FOR: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

struct Idle {
    id: u64,
    jobs: Sender<Job>,
}

#[derive(Default)]
struct Shared {
    idle: Vec<Idle>,
    next_id: u64,
}

#[derive(Clone, Default)]
pub struct Workers {
    shared: Arc<Mutex<Shared>>,
}

impl Workers {
    /// Runs `job` on an idle thread, or on a new one. The caller waits for
    /// its result by its own means (and may give up on it).
    pub fn run(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        let idle = self.lock().idle.pop();
        match idle {
            // A thread taken off the idle list never ends before its next
            // job (see `wait_for_work`), so the send reaches it.
            Some(worker) => match worker.jobs.send(job) {
                Ok(()) => Ok(()),
                Err(mpsc::SendError(job)) => self.spawn(job),
            },
            None => self.spawn(job),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self, first: Job) -> io::Result<()> {
        let (jobs, inbox) = mpsc::channel();
        let id = {
            let mut shared = self.lock();
            shared.next_id += 1;
            shared.next_id
        };
        let workers = self.clone();
        std::thread::Builder::new()
            .name("vfiod-kernel-call".into())
            .spawn(move || {
                first();
                workers.wait_for_work(id, &jobs, &inbox);
            })
            .map(|_| ())
    }

    fn wait_for_work(&self, id: u64, jobs: &Sender<Job>, inbox: &Receiver<Job>) {
        loop {
            self.lock().idle.push(Idle {
                id,
                jobs: jobs.clone(),
            });
            let job = loop {
                match inbox.recv_timeout(IDLE_FOR) {
                    Ok(job) => break job,
                    Err(RecvTimeoutError::Timeout) => {
                        let mut shared = self.lock();
                        // Still idle: nobody can hand it work any more.
                        if let Some(at) = shared.idle.iter().position(|w| w.id == id) {
                            shared.idle.swap_remove(at);
                            return;
                        }
                        // Taken just now: its job is on the way.
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            job();
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().idle.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn thread_of(workers: &Workers) -> std::thread::ThreadId {
        let (tx, rx) = channel();
        workers
            .run(move || tx.send(std::thread::current().id()).unwrap())
            .unwrap();
        rx.recv().unwrap()
    }

    #[test]
    fn a_thread_that_returned_takes_the_next_call() {
        let workers = Workers::default();
        let first = thread_of(&workers);
        // Back on the idle list once its job is done.
        while workers.idle() == 0 {
            std::thread::yield_now();
        }
        assert_eq!(thread_of(&workers), first);
    }

    #[test]
    fn a_call_that_does_not_return_does_not_hold_up_the_next() {
        let workers = Workers::default();
        let (release, hung) = channel::<()>();
        let stuck = thread_of(&workers);
        while workers.idle() == 0 {
            std::thread::yield_now();
        }
        // The idle thread takes the hanging call; the next one needs another.
        workers
            .run(move || {
                let _ = hung.recv();
            })
            .unwrap();
        let other = thread_of(&workers);
        assert_ne!(other, stuck);
        release.send(()).unwrap();
    }
}
