//! Tollgate's control plane: the admin API over a store of plans, customers, keys and admins,
//! and the publication feed gateways follow.
//!
//! `control-plane serve` reads its settings from the environment ([`settings`]), connects to
//! SQLite or Postgres ([`store`]), applies the migrations, makes sure a first admin token exists
//! and serves the API ([`api`]). It also starts [`spawn_usage_pruning`], which deletes raw usage
//! events past their retention.
//!
//! # Layout
//! - [`settings`]: `DATABASE_URL`, `CONTROL_PLANE_LISTEN`, `TOLLGATE_ADMIN_TOKEN`,
//!   `TOLLGATE_USAGE_RETENTION_DAYS`, checked.
//! - [`store`]: the store over `sqlx::Any`, with the audit and change logs.
//! - [`api`]: the axum router, errors, authentication and resources.
//! - [`secret`]: admin tokens and their hashes.
//! - [`snapshot`]: the gateway snapshot, built once per version into a gzip file and streamed.
//! - [`calendar`]: UTC days and months: the roll-up day of an event, the period a quota counts in.

pub mod api;
pub mod calendar;
pub mod secret;
pub mod settings;
pub mod snapshot;
pub mod store;

use std::time::Duration;

use secret::{PlainToken, Role, hash};
use store::Store;

/// The name of the admin token `TOLLGATE_ADMIN_TOKEN` sets.
pub const BOOTSTRAP_TOKEN_NAME: &str = "bootstrap (TOLLGATE_ADMIN_TOKEN)";

/// Makes sure the first admin can log in: the token from `TOLLGATE_ADMIN_TOKEN` is registered if
/// given, in place of the one an earlier value of it set, unless it was deleted through the API
/// or replaced by a later value (it stays deleted); otherwise a store without any admin token
/// gets a new one, returned to be printed once.
pub async fn ensure_first_admin(
    store: &Store,
    configured: Option<&str>,
) -> anyhow::Result<Option<PlainToken>> {
    if let Some(token) = configured {
        let hash = hash(token);
        if store.admin_token_by_hash(&hash).await?.is_some() {
            return Ok(None);
        }
        if store.admin_token_was_deleted(&hash).await? {
            tracing::warn!(
                "TOLLGATE_ADMIN_TOKEN is a token deleted through the admin API or replaced by a \
                 later value; it stays deleted (set a new one, or use another admin token)"
            );
            return Ok(None);
        }
        match store
            .replace_admin_token(BOOTSTRAP_TOKEN_NAME, Role::Admin, &hash, true)
            .await
        {
            Ok((_, replaced)) if replaced > 0 => tracing::info!(
                "TOLLGATE_ADMIN_TOKEN changed: the token its earlier value set no longer works"
            ),
            Ok(_) => {}
            // Another control plane on the store registered the same value at the same moment.
            Err(store::StoreError::Conflict(_))
                if store.admin_token_by_hash(&hash).await?.is_some() => {}
            Err(error) => return Err(error.into()),
        }
        return Ok(None);
    }
    if store.admin_token_count().await? > 0 {
        return Ok(None);
    }
    let token = PlainToken::generate();
    store
        .create_admin_token("bootstrap (generated)", Role::Admin, &hash(token.expose()))
        .await?;
    Ok(Some(token))
}

/// The name of the token a gateway gives the control plane it runs in its own process, for the
/// gateway known as `instance` (host and admin address): gateways sharing one store each keep
/// their own.
pub fn embedded_gateway_token_name(instance: &str) -> String {
    format!("embedded gateway {instance}")
}

/// What becomes of the other tokens of an embedded gateway's name when it gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherTokens {
    /// Replaced: at start, the one of its previous run goes.
    Replaced,
    /// Kept: after its own was deleted through the admin API, the new one is added beside
    /// any other of the same name (two such gateways on one store would otherwise delete each
    /// other's, in turn); the next start replaces them all.
    Kept,
}

/// A new `gateway` token for the gateway `instance` running this control plane in its own
/// process, its name's `others` replaced or kept. Only its hash is stored.
pub async fn embedded_gateway_token(
    store: &Store,
    instance: &str,
    others: OtherTokens,
) -> anyhow::Result<PlainToken> {
    let token = PlainToken::generate();
    let (name, hash) = (embedded_gateway_token_name(instance), hash(token.expose()));
    match others {
        OtherTokens::Replaced => {
            store
                .replace_admin_token(&name, Role::Gateway, &hash, false)
                .await?;
        }
        OtherTokens::Kept => {
            store
                .create_admin_token(&name, Role::Gateway, &hash)
                .await?;
        }
    }
    Ok(token)
}

/// How often [`spawn_usage_pruning`] deletes raw usage events past their retention.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Starts the job that deletes raw usage events older than `retention` (the daily roll-up
/// stays), but none of a customer's current billing period ([`Store::prune_cutoff`]): right
/// away, then every [`PRUNE_EVERY`]. `control-plane serve` starts it, and so
/// does a gateway running the control plane in its own process. A failed pass is logged and the
/// next one tries again; several control planes on one database may all run it (deleting twice
/// deletes nothing more). Call it from within a Tokio runtime; abort the handle to stop it.
pub fn spawn_usage_pruning(store: Store, retention: Duration) -> tokio::task::JoinHandle<()> {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PRUNE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let before_ms = match store.prune_cutoff(retention_ms, store::now_ms()).await {
                Ok(cutoff) => cutoff,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the billing periods; pruning waits");
                    continue;
                }
            };
            match store.prune_usage(before_ms).await {
                Ok(0) => {}
                Ok(deleted) => {
                    tracing::info!(deleted, before = %store::rfc3339(before_ms), "usage events pruned");
                }
                Err(error) => tracing::warn!(%error, "cannot prune usage events"),
            }
        }
    })
}

/// `error` and its causes, each once: a cause whose text its error already ends with (sqlx's
/// database errors repeat their source's) is not repeated.
pub fn causes(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Resolves on SIGINT or SIGTERM (what service managers send to stop a process).
pub async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_its_error_already_tells_is_printed_once() {
        #[derive(Debug)]
        struct Repeats;
        impl std::fmt::Display for Repeats {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("database \"x\" does not exist")
            }
        }
        impl std::error::Error for Repeats {}
        let error = anyhow::Error::new(Repeats)
            .context("error returned from database: database \"x\" does not exist")
            .context("DATABASE_URL: cannot connect");
        assert_eq!(
            causes(&error),
            "DATABASE_URL: cannot connect: error returned from database: database \"x\" does not \
             exist"
        );
    }
}
