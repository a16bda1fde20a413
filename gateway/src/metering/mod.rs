//! Metering: one usage event per admitted request, in the usage ledger exactly once, whatever
//! crashes.
//!
//! The event is written to the [`spool`] as the response header goes out (a *pending* record: the
//! client is getting a response, so the request counts), and again when the request is over with
//! its final latency and sizes. The [`flush`]er sends closed segments to the ledger in batches
//! (the embedded store, or the control plane's `POST /v1/gateway/usage`); the store keeps each
//! event id once, so what is sent twice counts once. A store outage only delays the sending; the
//! spool is bounded, and a full spool refuses new metered requests (503) rather than lose their
//! usage.
//!
//! # Layout
//! - [`record`]: a usage record as a line of the spool.
//! - [`spool`]: the append-only segments on local disk.
//! - [`flush`]: the background service that sends and deletes them.
//! - [`ledger`]: the ledger in the embedded store, or behind the control plane's API.
//! - [`metrics`]: spool fill and events written, stored and recovered.

pub mod flush;
pub mod ledger;
pub mod metrics;
pub mod record;
pub mod spool;

use std::sync::Arc;

use metrics::MeteringMetrics;
use record::{Kind, Usage};
use spool::Spool;

/// The spool and its metrics: what the request path writes usage through.
#[derive(Debug)]
pub struct Meter {
    /// The spool.
    pub spool: Spool,
    /// Its metrics.
    pub metrics: MeteringMetrics,
}

impl Meter {
    /// Appends a record; a refusal of the disk is logged and counted (the request was already
    /// answered, so there is nothing else to do with it).
    pub fn append(&self, kind: Kind, usage: &Usage<'_>) {
        let mut line = Vec::with_capacity(256);
        record::encode(kind, usage, &mut line);
        match self.spool.append(&line) {
            Ok(()) => {
                if kind == Kind::Final {
                    self.metrics.spooled();
                }
            }
            Err(error) => {
                self.metrics.spool_error();
                tracing::error!(%error, "cannot write a usage record to the spool");
            }
        }
    }
}

/// A metered request's usage, from its admission to its end.
#[derive(Debug)]
pub struct Metered {
    /// Where its records go.
    pub meter: Arc<Meter>,
    /// What its pending record said, once the response header went out.
    pub written: Option<Written>,
}

/// The fields of a request's usage fixed when its response header went out; the final record
/// repeats them with the final latency and sizes.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// The event id (UUIDv7 bytes).
    pub id: [u8; 16],
    /// The status the client received.
    pub status: u16,
    /// Unix ms of the decision.
    pub at_ms: i64,
    /// Billable units (0 when refunded).
    pub units: u64,
    /// Of them, overage units.
    pub overage: u64,
}
