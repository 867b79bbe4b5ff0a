//! The tasks a process cannot do without, watched: when one ends before the process is told to
//! stop (an error, a panic, or a plain return from a loop meant to run for ever), the process
//! logs which task and why and exits with code 1, so that Kubernetes restarts it. A process
//! that limps on without its lease loop or its metrics server looks alive and does nothing.
//!
//! ```text
//!   Vital::add("announcer", fut)      ┐
//!   Vital::spawn("metrics server", f) ├─> run(stop): first end before stop ─> log, exit(1)
//!   ...                               ┘              stop ─> wait for all; failures returned
//! ```

use std::any::Any;
use std::fmt::{self, Display};
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

/// Test hook, for the lab and the binaries' tests only: `FERROLB_FAULT_END_TASK=name[,name…]`
/// makes the vital tasks of those names panic as they start, so tests can watch the process
/// notice. Unset in any real deployment.
pub const FAULT_END_TASK_ENV: &str = "FERROLB_FAULT_END_TASK";

/// Whether [`FAULT_END_TASK_ENV`] names `task`.
pub fn fault_injected(task: &str) -> bool {
    std::env::var(FAULT_END_TASK_ENV).is_ok_and(|v| v.split(',').any(|t| t.trim() == task))
}

/// How a vital task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// It returned without an error, though it was meant to run until told to stop.
    Returned,
    /// It returned this error.
    Failed(String),
    /// It panicked with this message.
    Panicked(String),
}

/// A vital task that ended, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub task: String,
    pub how: How,
}

impl Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.how {
            How::Returned => write!(f, "the {} task ended", self.task),
            How::Failed(e) => write!(f, "the {} task failed: {e}", self.task),
            How::Panicked(m) => write!(f, "the {} task panicked: {m}", self.task),
        }
    }
}

impl std::error::Error for Ended {}

/// What a task's output says about how it ended: `()` and `Ok(())` returned, `Err` failed.
pub trait Outcome {
    fn how(self) -> How;
}

impl Outcome for () {
    fn how(self) -> How {
        How::Returned
    }
}

impl<E: Display> Outcome for Result<(), E> {
    fn how(self) -> How {
        match self {
            Ok(()) => How::Returned,
            // `{:#}` prints an anyhow error with its causes.
            Err(e) => How::Failed(format!("{e:#}")),
        }
    }
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Aborts the spawned task when the set holding it is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A set of named vital tasks.
#[derive(Default)]
pub struct Vital<'a> {
    tasks: FuturesUnordered<LocalBoxFuture<'a, Ended>>,
}

impl<'a> Vital<'a> {
    pub fn new() -> Self {
        Vital { tasks: FuturesUnordered::new() }
    }

    /// Watches `task`, run in the caller's task when the set is polled (it may borrow).
    pub fn add<O: Outcome>(&mut self, name: &str, task: impl Future<Output = O> + 'a) {
        let name = name.to_string();
        let faulty = fault_injected(&name);
        self.tasks.push(
            async move {
                if faulty {
                    let msg = format!("fault injected by {FAULT_END_TASK_ENV}");
                    return Ended { task: name, how: How::Panicked(msg) };
                }
                let how = match AssertUnwindSafe(task).catch_unwind().await {
                    Ok(o) => o.how(),
                    Err(p) => How::Panicked(panic_message(p.as_ref())),
                };
                Ended { task: name, how }
            }
            .boxed_local(),
        );
    }

    /// Spawns `task` on the runtime and watches it; it is aborted when the set is dropped.
    pub fn spawn<O: Outcome + Send + 'static>(&mut self, name: &str, task: impl Future<Output = O> + Send + 'static) {
        let faulty = fault_injected(name);
        let handle = tokio::spawn(async move {
            if faulty {
                panic!("fault injected by {FAULT_END_TASK_ENV}");
            }
            task.await.how()
        });
        let guard = AbortOnDrop(handle.abort_handle());
        let name = name.to_string();
        self.tasks.push(
            async move {
                let _guard = guard;
                let how = match handle.await {
                    Ok(how) => how,
                    Err(e) if e.is_panic() => How::Panicked(panic_message(e.into_panic().as_ref())),
                    Err(e) => How::Failed(e.to_string()),
                };
                Ended { task: name, how }
            }
            .boxed_local(),
        );
    }

    /// The next task to end; never resolves while none is left.
    pub async fn next_end(&mut self) -> Ended {
        match self.tasks.next().await {
            Some(ended) => ended,
            None => std::future::pending().await,
        }
    }

    /// Runs the tasks until `stop` resolves, then until each has ended; the first that failed
    /// or panicked meanwhile, if any. A task that ends before `stop` ends the process: see
    /// [`exit`].
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<(), Ended> {
        // Stop first: a task that ends because the process was told to stop is no failure.
        tokio::select! {
            biased;
            () = stop => {}
            ended = self.next_end() => exit(&ended),
        }
        let mut first = None;
        while let Some(ended) = self.tasks.next().await {
            match ended.how {
                How::Returned => {}
                _ => {
                    tracing::error!(task = %ended.task, "{ended}");
                    first.get_or_insert(ended);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Logs that a vital task ended and exits with code 1, at once: the process cannot do its job,
/// and Kubernetes restarts a container that exits. (Returning from `main` would wait for
/// blocking threads that may never finish.)
pub fn exit(ended: &Ended) -> ! {
    tracing::error!(task = %ended.task, "{ended}; exiting so that the process is restarted");
    eprintln!("ferrolb: {ended}; exiting");
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_to_end_is_named_with_how_it_ended() {
        let mut v = Vital::new();
        v.add("forever", std::future::pending::<()>());
        v.add("fails", async { Err::<(), _>("no lease API") });
        assert_eq!(v.next_end().await, Ended { task: "fails".into(), how: How::Failed("no lease API".into()) });

        let mut v = Vital::new();
        v.add("forever", std::future::pending::<()>());
        v.add("panics", async {
            panic!("boom");
            #[allow(unreachable_code)]
            ()
        });
        assert_eq!(v.next_end().await, Ended { task: "panics".into(), how: How::Panicked("boom".into()) });

        let mut v = Vital::new();
        v.spawn("spawned", async {
            panic!("{}", "formatted boom");
            #[allow(unreachable_code)]
            ()
        });
        let e = v.next_end().await;
        assert_eq!(e, Ended { task: "spawned".into(), how: How::Panicked("formatted boom".into()) });
        assert_eq!(e.to_string(), "the spawned task panicked: formatted boom");

        let mut v = Vital::new();
        v.spawn("returns", async {});
        assert_eq!(v.next_end().await.how, How::Returned);
    }

    #[tokio::test]
    async fn after_stop_every_task_is_awaited_and_a_failure_returned() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut v = Vital::new();
        v.add("clean", stopped(rx.clone()));
        let r = rx.clone();
        v.add("unclean", async move {
            stopped(r).await;
            Err::<(), _>("could not release")
        });
        let _ = tx.send(true);
        let ended = v.run(stopped(rx)).await;
        assert_eq!(ended, Err(Ended { task: "unclean".into(), how: How::Failed("could not release".into()) }));
    }

    #[tokio::test]
    async fn dropping_the_set_aborts_spawned_tasks() {
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let mut v = Vital::new();
        v.spawn("holder", async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(v);
        // The sender is dropped with the aborted task.
        assert!(tokio::time::timeout(std::time::Duration::from_secs(5), &mut rx).await.is_ok_and(|r| r.is_err()));
    }
}
