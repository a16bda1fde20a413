//! SIGTERM: stop accepting, let requests in flight finish within the grace period, exit 0.
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
        tokio::select! {
            _ = term.recv() => {}
            _ = quit.recv() => {}
            _ = interrupt.recv() => {
                tracing::info!("SIGINT: exiting now");
                return ShutdownSignal::FastShutdown;
            }
        }
        let in_flight = self.gateway.metrics.in_flight.get();
        tracing::info!(
            in_flight,
            grace_period_ms = self.gateway.server.grace_period.as_millis() as u64,
            "SIGTERM: draining"
        );
        self.gateway.draining.store(true, Ordering::SeqCst);
        let gateway = self.gateway.clone();
        std::thread::Builder::new()
            .name("drain".into())
            .spawn(move || exit_when_drained(&gateway))
            .ok();
        ShutdownSignal::GracefulTerminate
    }
}

/// Exits 0 once no request is in flight, or at once on SIGINT or a second SIGTERM. Runs on its
/// own thread and runtime: Pingora's main loop has stopped listening for signals by now.
fn exit_when_drained(gateway: &Gateway) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot watch the drain; Pingora ends it after the grace period");
            return;
        }
    };
    runtime.block_on(async {
        let (Ok(mut term), Ok(mut interrupt)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers for the drain");
            return;
        };
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
                    // Two idle polls in a row, so a request whose context is being created is
                    // not cut.
                    if gateway.metrics.in_flight.get() <= 0 {
                        idle_polls += 1;
                        if idle_polls >= 2 {
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
    });
}
