//! SIGTERM: stop accepting, let requests in flight finish within the grace period, send their
//! usage to the ledger, exit 0.
//! SIGINT, or a second SIGTERM while draining, exits at once.
//!
//! Pingora stops its listeners when told to terminate gracefully, then waits its whole grace
//! period before exiting. We exit as soon as no request is in flight instead, so a rolling
//! deploy does not wait the full grace period on an idle gateway; past the grace period Pingora
//! ends what is left.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};

use crate::state::Gateway;

/// How often the drain checks for requests in flight.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// The longest a drained gateway waits to add its batched quota units to Redis before it exits.
const FINAL_SHARE: Duration = Duration::from_secs(2);
/// The longest a drained gateway waits for the flusher to send the usage of the drained
/// requests before it exits; what it has not sent by then is sent at the next start.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// The signal watcher handed to Pingora.
#[derive(Debug)]
pub struct Signals {
    gateway: Arc<Gateway>,
}

impl Signals {
    /// Watches signals for `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut interrupt), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return std::future::pending().await;
        };
        self.gateway
            .shutdown_handlers_ready
            .store(true, Ordering::SeqCst);
        tokio::select! {
            _ = term.recv() => {}
            _ = quit.recv() => {}
            _ = interrupt.recv() => {
                tracing::info!("SIGINT: exiting now");
                return ShutdownSignal::FastShutdown;
            }
        }
        self.gateway.draining.store(true, Ordering::SeqCst);
        match Drain::watch(self.gateway.clone()) {
            Ok(drain) => {
                std::thread::Builder::new()
                    .name("drain".into())
                    .spawn(move || drain.run())
                    .ok();
            }
            Err(error) => {
                tracing::error!(%error, "cannot watch the drain; Pingora ends it after the grace period");
            }
        }
        tracing::info!(
            in_flight = self.gateway.metrics.in_flight.get(),
            grace_period_ms = self.gateway.server.grace_period.as_millis() as u64,
            "SIGTERM: draining"
        );
        ShutdownSignal::GracefulTerminate
    }
}

/// The drain: exits 0 once no request is in flight, or at once on SIGINT or a second SIGTERM.
///
/// It runs on its own thread and runtime, because Pingora's main loop stops listening for
/// signals once it has one. The signal listeners are registered before the drain is announced,
/// so a second signal sent right after the announcement is never missed.
struct Drain {
    gateway: Arc<Gateway>,
    runtime: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Drain {
    fn watch(gateway: Arc<Gateway>) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (term, interrupt) = {
            let _context = runtime.enter();
            (
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            )
        };
        Ok(Self {
            gateway,
            runtime,
            term,
            interrupt,
        })
    }

    fn run(self) {
        let Drain {
            gateway,
            runtime,
            mut term,
            mut interrupt,
        } = self;
        runtime.block_on(async {
            let deadline = Instant::now() + gateway.server.grace_period;
            let mut poll = tokio::time::interval(DRAIN_POLL);
            let mut idle_polls = 0;
            while Instant::now() < deadline {
                tokio::select! {
                    _ = term.recv() => {
                        tracing::warn!(in_flight = gateway.metrics.in_flight.get(), "second SIGTERM: exiting now");
                        std::process::exit(0);
                    }
                    _ = interrupt.recv() => {
                        tracing::warn!(in_flight = gateway.metrics.in_flight.get(), "SIGINT: exiting now");
                        std::process::exit(0);
                    }
                    _ = poll.tick() => {
                        // Two idle polls in a row, so a request whose context is being created
                        // is not cut.
                        if gateway.metrics.in_flight.get() <= 0 {
                            idle_polls += 1;
                            if idle_polls >= 2 {
                                // Quota units batched for Redis go there first, for at most
                                // FINAL_SHARE, and the usage the drained requests wrote goes
                                // to the ledger, for at most FINAL_FLUSH (a signal still exits
                                // at once).
                                let left = deadline.saturating_duration_since(Instant::now());
                                gateway.final_flush.drained();
                                let share = tokio::time::timeout(
                                    FINAL_SHARE.min(left),
                                    gateway.limiter.share_last(),
                                );
                                let flush = tokio::time::timeout(
                                    FINAL_FLUSH.min(left),
                                    gateway.final_flush.until_flushed(),
                                );
                                tokio::select! {
                                    _ = async { tokio::join!(share, flush) } => {}
                                    _ = term.recv() => {}
                                    _ = interrupt.recv() => {}
                                }
                                tracing::info!("drained: no request in flight, exiting");
                                std::process::exit(0);
                            }
                        } else {
                            idle_polls = 0;
                        }
                    }
                }
            }
            tracing::warn!(
                in_flight = gateway.metrics.in_flight.get(),
                "grace period over with requests in flight; ending them"
            );
            // The flusher sends what is written while Pingora ends the rest.
            gateway.final_flush.drained();
        });
    }
}
