//! The end-to-end harness: the real `gateway` binary, started on `127.0.0.1:0` with a config the
//! test writes, in front of real HTTP upstreams started by the test.
//!
//! # Layout
//! - [`gateway`]: starting, reconfiguring, signalling and reading the logs of a gateway process.
//! - [`control_plane`]: a `control-plane serve` process, fresh Postgres databases, and a client
//!   of the admin API.
//! - [`upstream`]: test upstream servers (echo, slow, streaming, WebSocket, health toggles).
//! - [`tls`]: self-signed certificates for TLS listeners.
//! - [`raw`]: a bare HTTP/1.1 connection, for tests about one particular connection.
//! - [`redis`]: a Redis server of the test's own, to kill, restart, freeze or flush.
//! - [`blackhole`]: an address whose connections never complete, for connect timeouts.
//! - [`relay`]: a TCP relay that holds what clients send, then passes it on or drops it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

pub mod blackhole;
pub mod control_plane;
pub mod gateway;
pub mod raw;
pub mod redis;
pub mod relay;
pub mod tls;
pub mod upstream;

pub use gateway::{Gateway, config, proxy_route};
pub use upstream::Upstream;

/// The names of the gateway's eleven limit headers, as clients read them (lower case).
pub const LIMIT_HEADERS: [&str; 11] = [
    "ratelimit-policy",
    "ratelimit",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-quota-limit",
    "x-quota-remaining",
    "x-quota-reset",
];

/// A client that keeps connections alive and never follows redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}
