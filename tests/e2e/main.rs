//! End-to-end tests: the real gateway binary against real upstreams.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod balancing;
mod headers;
mod jwt;
mod limits;
mod metering;
mod observability;
mod plans;
mod protocols;
mod proxying;
mod reload;
mod shared_counters;
mod shutdown;
mod timeouts;
mod validate;
