//! Tollgate's shared domain and wire types.
//!
//! This crate does no I/O and depends on neither tokio, Pingora, axum nor sqlx, so the gateway, the
//! control plane and their tests agree on one definition of everything that crosses a boundary.
//!
//! # Layout
//! - [`problem`]: RFC 9457 problem details, the one error body clients of either plane ever see.
//! - [`plan`]: plans, their rate limits, quota and price.
//! - [`period`]: the period a quota counts in (billing period, else the calendar month in UTC).
//! - [`customer`]: customers and their state.
//! - [`key`]: the API key format (prefix, randomness, checksum).
//! - [`feed`]: the snapshot and the changes gateways receive.
//! - [`usage`]: usage events, the batches gateways send and the per-period totals they read.

pub mod customer;
pub mod feed;
pub mod key;
pub mod period;
pub mod plan;
pub mod problem;
pub mod usage;

pub use problem::{FieldError, PROBLEM_CONTENT_TYPE, Problem};
