//! Tollgate's data plane: a Pingora reverse proxy configured by one TOML file.
//!
//! `gateway --config gateway.toml` loads and checks the file, starts the proxy listeners, the
//! admin listener, the health checker and the config watcher, and runs until SIGTERM. Requests
//! read one immutable config ([`state::Live`]) swapped atomically on reload; they never take a
//! lock or do I/O other than the upstream exchange itself.
//!
//! # Layout
//! - [`config`]: the file's types, loading with every problem reported, conversion to checked types.
//! - [`routing`]: the route table (host, longest prefix, method).
//! - [`upstream`]: pools, round robin over available targets, health state and active checks.
//! - [`proxy`]: the `ProxyHttp` implementation, problem responses, request ids.
//! - [`state`]: the shared state and the atomically swapped running config.
//! - [`metrics`]: Prometheus metric names and per-route handles.
//! - [`admin`]: `/health`, `/health/ready`, `/metrics` on the admin listener.
//! - [`reload`]: file watch and SIGHUP.
//! - [`shutdown`]: SIGTERM draining.
//! - [`logging`]: the `tracing` subscriber.
//! - [`server`]: building and running the Pingora server.
//! - [`listen_check`]: confirming after start-up that this process holds every proxy port.
//! - [`identity`]: plans, customers and keys from the control plane; API-key checks.
//! - [`limits`]: rate limits and quotas per customer, and their response headers.
//! - [`metering`]: usage events, spooled on disk and sent to the usage ledger.

pub mod admin;
pub mod config;
pub mod identity;
pub mod limits;
pub mod listen_check;
pub mod logging;
pub mod metering;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod upstream;
