//! SIGTERM: stop accepting, let requests in flight finish within the grace period, exit 0.
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

fn exit_when_drained(gateway: &Gateway) {
    let deadline = Instant::now() + gateway.server.grace_period;
    let mut idle_polls = 0;
    while Instant::now() < deadline {
        // Two idle polls in a row, so a request whose context is being created is not cut.
        if gateway.metrics.in_flight.get() <= 0 {
            idle_polls += 1;
            if idle_polls >= 2 {
                tracing::info!("drained: no request in flight, exiting");
                std::process::exit(0);
            }
        } else {
            idle_polls = 0;
        }
        std::thread::sleep(DRAIN_POLL);
    }
    tracing::warn!(
        in_flight = gateway.metrics.in_flight.get(),
        "grace period over with requests in flight; ending them"
    );
}
