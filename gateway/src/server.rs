//! Building the Pingora server from a checked config and running it.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pingora::connectors::ConnectorOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;

use crate::admin::Embedded;
use crate::config::{Config, FeedSource};
use crate::identity::follow::{Follower, Source, Stored, Token};
use crate::listen_check::ListenCheck;
use crate::metering::flush::Flusher;
use crate::metering::ledger::{HttpLedger, Ledger, StoreLedger};
use crate::proxy::Proxy;
use crate::reload::ConfigWatcher;
use crate::shutdown::Signals;
use crate::state::Gateway;
use crate::upstream::check::HealthChecker;

/// Loads the config at `path`, starts every service and blocks until shutdown.
pub fn run(path: PathBuf) -> anyhow::Result<()> {
    let (text, config) = Config::from_file(&path)
        .map_err(|errors| anyhow::anyhow!("{} has problems:\n{errors}", path.display()))?;
    crate::logging::init(&config.log)?;
    let requested: Vec<SocketAddr> = config
        .server
        .listen
        .iter()
        .chain(config.server.tls.iter().map(|t| &t.listen))
        .copied()
        .collect();
    let mut chosen = choose_ports(&requested)?.into_iter();
    let listen: Vec<ProxyListener> = chosen
        .by_ref()
        .take(config.server.listen.len())
        .map(|address| ProxyListener { address })
        .collect();
    let tls: Vec<(ProxyListener, crate::config::TlsListener)> = chosen
        .zip(config.server.tls.iter().cloned())
        .map(|(address, t)| (ProxyListener { address }, t))
        .collect();
    let admin_listener = TcpListener::bind(config.server.admin_listen).with_context(|| {
        format!(
            "cannot bind the admin listener {}",
            config.server.admin_listen
        )
    })?;
    let admin_listen = admin_listener.local_addr()?;
    let control_plane = config.control_plane.clone();
    // Settings from the environment are checked before anything starts.
    let (embedded, remote_token) = match control_plane.as_ref().map(|cp| &cp.source) {
        Some(FeedSource::Embedded { database_url }) => {
            let admin_token = tollgate_control_plane::settings::admin_token(
                std::env::var("TOLLGATE_ADMIN_TOKEN").ok(),
            )?;
            let usage_retention = tollgate_control_plane::settings::usage_retention(
                std::env::var("TOLLGATE_USAGE_RETENTION_DAYS").ok(),
            )?;
            let embedded = Embedded {
                database_url: database_url.clone(),
                admin_token,
                admin_listen,
                usage_retention,
            };
            (Some(embedded), None)
        }
        Some(FeedSource::Remote { token_env, .. }) => {
            let token = std::env::var(token_env)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .with_context(|| {
                    format!(
                        "control_plane.token_env: the environment variable {token_env} is not set; \
                         it must hold a control-plane token with role \"gateway\""
                    )
                })?;
            (None, Some(token))
        }
        None => (None, None),
    };

    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool_size,
        ca_file: config
            .server
            .upstream_ca_file
            .as_ref()
            .map(|path| path.to_string_lossy().into_owned()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut tls_services = Vec::new();
    for (proxy_listener, listener) in &tls {
        let address = proxy_listener.address;
        let mut settings = TlsSettings::intermediate(
            &listener.cert.to_string_lossy(),
            &listener.key.to_string_lossy(),
        )
        .with_context(|| format!("cannot load the TLS certificate or key for {address}"))?;
        if listener.http2 {
            settings.enable_h2();
        }
        tls_services.push((address.to_string(), settings));
    }

    let gateway = Gateway::new(path, text, config)?;
    let mut proxy =
        http_proxy_service_with_name(&server.configuration, Proxy::new(gateway.clone()), "proxy");
    for listener in &listen {
        proxy.add_tcp(&listener.address.to_string());
    }
    for (address, settings) in tls_services {
        proxy.add_tls_with_settings(&address, None, settings);
    }
    server.add_service(proxy);
    let started = crate::admin::start(admin_listener, gateway.clone(), embedded)?;
    if let Some(cp) = &control_plane {
        let source = match (&cp.source, started.gateway_token, remote_token) {
            (FeedSource::Embedded { .. }, Some(token), _) => Source {
                base_url: format!("http://{}", loopback(admin_listen)),
                token: Token::new(token.expose().to_owned()),
                renewal: started.renewal,
            },
            (FeedSource::Remote { url, .. }, _, Some(token)) => Source {
                base_url: url.clone(),
                token: Token::new(token),
                renewal: None,
            },
            _ => anyhow::bail!("the control plane's token is missing"),
        };
        let ledger: Arc<dyn Ledger> = match (&cp.source, started.store) {
            (FeedSource::Embedded { .. }, Some(store)) => Arc::new(StoreLedger(store)),
            _ => Arc::new(HttpLedger::new(&source.base_url, source.token.expose())?),
        };
        gateway.limiter.set_ledger(ledger);
        // By then every gateway has flushed the events it held when a count was rebuilt.
        gateway
            .limiter
            .reseed_after(2 * gateway.live().metering.flush_interval + Duration::from_secs(1));
        if let Some(meter) = &gateway.meter {
            let embedded = matches!(cp.source, FeedSource::Embedded { .. });
            let flusher = Flusher::new(
                gateway.clone(),
                Arc::clone(meter),
                gateway.live().metering.flush_interval,
                gateway.live().metering.batch_size(embedded),
            );
            // What an earlier process left in the spool is stored before requests are counted,
            // so quota counters rebuilt from the ledger include it.
            flusher.recover();
            server.add_service(background_service("usage flusher", flusher));
        }
        if let Some(directory) = cp.snapshot_file.parent()
            && let Err(error) = std::fs::create_dir_all(directory)
        {
            tracing::warn!(%error, directory = %directory.display(), "control_plane.snapshot_file: cannot make its directory; identities will not be kept for a restart");
        }
        let follower = Follower::new(
            gateway.clone(),
            source,
            Stored::new(cp.snapshot_file.clone()),
        )?;
        follower.restore();
        server.add_service(background_service("identity follower", follower));
    }
    if let Some(refresher) =
        crate::identity::jwt::JwksRefresher::new(&gateway.jwt, gateway.metrics.clone())?
    {
        server.add_service(background_service("jwks refresh", refresher));
    }
    server.add_service(background_service(
        "counter sweep",
        crate::limits::CounterSweep::new(gateway.clone()),
    ));
    if gateway.limiter.redis().is_some() {
        server.add_service(background_service(
            "redis counters",
            crate::limits::redis::Connector::new(gateway.clone()),
        ));
    }
    server.add_service(background_service(
        "health checks",
        HealthChecker::new(
            gateway.clone(),
            ConnectorOptions::from_server_conf(&server.configuration),
        ),
    ));
    server.add_service(background_service(
        "listen check",
        ListenCheck {
            listen: listen.iter().map(|l| l.address).collect(),
            tls_listen: tls.iter().map(|(l, _)| l.address).collect(),
            admin_listen,
            gateway: gateway.clone(),
        },
    ));
    server.add_service(background_service(
        "config watcher",
        ConfigWatcher::new(gateway.clone()),
    ));

    let join = |addresses: &mut dyn Iterator<Item = &SocketAddr>| {
        addresses
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    tracing::info!(
        listen = %join(&mut listen.iter().map(|l| &l.address)),
        tls_listen = %join(&mut tls.iter().map(|(l, _)| &l.address)),
        admin_listen = %admin_listen,
        threads = gateway.server.threads,
        config_version = 1,
        "tollgate gateway starting"
    );
    let signals = Signals::new(gateway);
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    tracing::info!("tollgate gateway stopped");
    Ok(())
}

/// The address to reach a listener bound to `address` from this host.
fn loopback(address: SocketAddr) -> SocketAddr {
    let mut address = address;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    address
}

/// A proxy listen address, made ready for Pingora (which binds it itself when it starts).
struct ProxyListener {
    /// The address Pingora binds, port 0 resolved.
    address: SocketAddr,
}

/// Binds every proxy address once, then releases them all for Pingora to bind.
///
/// Port 0 asks for a free port: the kernel picks one for the socket bound here (all sockets are
/// held until every port is picked, so two `:0` listeners never get the same one). Another
/// process can take a port between its release and Pingora's bind; the [`ListenCheck`] sees that
/// and stops the gateway rather than leave it without a listener. A fixed port is bound here
/// too, so a port already in use stops the start with a clear error (Pingora would only panic
/// in its own thread).
fn choose_ports(requested: &[SocketAddr]) -> anyhow::Result<Vec<SocketAddr>> {
    let held: Vec<TcpListener> = requested
        .iter()
        .map(|address| {
            TcpListener::bind(address).with_context(|| format!("cannot listen on {address}"))
        })
        .collect::<anyhow::Result<_>>()?;
    held.iter()
        .map(|listener| Ok(listener.local_addr()?))
        .collect()
}

/// How `gateway --replay-rejected` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Every file was stored (or there was none).
    AllStored,
    /// Some files are kept: the ledger still refuses events, or a file is not whole.
    SomeKept,
    /// The ledger was unavailable: the replay stopped; run it again later.
    Stopped,
}

/// `gateway --replay-rejected`: sends the usage kept in the spool's `rejected/` directory to the
/// ledger of the config at `path` (the embedded store, or the control plane it follows) and
/// prints what happened. The embedded store is opened as it is: never created or migrated here,
/// since the running gateway owns it.
pub fn replay_rejected(path: &std::path::Path) -> anyhow::Result<ReplayOutcome> {
    let (_, config) = Config::from_file(path).map_err(|errors| {
        anyhow::anyhow!(
            "{}: {} problem(s): {}",
            path.display(),
            errors.0.len(),
            errors
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let Some(control_plane) = &config.control_plane else {
        anyhow::bail!(
            "{}: no [control_plane], so no usage ledger to replay to",
            path.display()
        );
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let ledger: Box<dyn Ledger> = match &control_plane.source {
            FeedSource::Embedded { database_url } => {
                let redacted = tollgate_control_plane::settings::redact_url(database_url);
                // Open, never create: a missing store is an error, not an empty ledger.
                let url = database_url.replace("mode=rwc", "mode=rw");
                let store = tollgate_control_plane::store::Store::connect(&url)
                    .await
                    .with_context(|| {
                        format!("control_plane.database_url: cannot open {redacted}")
                    })?;
                let ready = store.is_ready().await.with_context(|| {
                    format!("control_plane.database_url: cannot read {redacted}")
                })?;
                anyhow::ensure!(
                    ready,
                    "control_plane.database_url: {redacted} is not at this gateway's version; \
                     start the gateway once to bring it up to date"
                );
                Box::new(StoreLedger(store))
            }
            FeedSource::Remote { url, token_env } => {
                let token = std::env::var(token_env)
                    .ok()
                    .filter(|t| !t.trim().is_empty())
                    .with_context(|| {
                        format!(
                            "control_plane.token_env: the environment variable {token_env} is not \
                             set; it must hold a control-plane token with role \"gateway\""
                        )
                    })?;
                Box::new(HttpLedger::new(url, &token)?)
            }
        };
        let spool_dir = &config.metering.spool_dir;
        let embedded = matches!(control_plane.source, FeedSource::Embedded { .. });
        let replayed = crate::metering::replay::replay(
            spool_dir,
            ledger.as_ref(),
            config.metering.batch_size(embedded),
        )
        .await?;
        println!(
            "{}: {} file(s) stored ({} event(s) new to the ledger, {} it had already), {} kept",
            spool_dir.join("rejected").display(),
            replayed.files_stored,
            replayed.inserted,
            replayed.duplicates,
            replayed.kept.len()
        );
        for (file, reason) in &replayed.kept {
            println!("  kept {}: {reason}", file.display());
        }
        Ok(match &replayed.stopped {
            Some(why) => {
                println!("  stopped: {why}");
                ReplayOutcome::Stopped
            }
            None if replayed.kept.is_empty() => ReplayOutcome::AllStored,
            None => ReplayOutcome::SomeKept,
        })
    })
}

/// Checks the config at `path` and prints every problem; returns whether it is valid.
pub fn validate(path: &std::path::Path) -> bool {
    match Config::from_file(path) {
        Ok((_, config)) => {
            println!(
                "{}: ok ({} routes, {} upstreams)",
                path.display(),
                config.routes.len(),
                config.upstreams.len()
            );
            true
        }
        Err(errors) => {
            eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
            for error in &errors.0 {
                eprintln!("  {error}");
            }
            false
        }
    }
}
