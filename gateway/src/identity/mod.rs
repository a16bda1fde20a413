//! Who is calling: the identities learned from the control plane, and the checks of the request
//! path.
//!
//! # Layout
//! - [`index`]: the compact, immutable index of plans, customers and keys at one version.
//! - [`snapshot`]: reading a snapshot's JSON entry by entry into the index, also as it downloads.
//! - [`follow`]: loading the snapshot, following the change feed.
//! - [`stored`]: the last good snapshot and its journal of changes, on disk.
//! - [`failures`]: failed authentications per client address, refused past a rate.
//! - [`jwt`]: JWT verification and the background JWKS refresh.

pub mod failures;
pub mod follow;
pub mod index;
pub mod jwt;
pub mod snapshot;
pub mod stored;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};
use tollgate_model::customer::CustomerStatus;

use index::{Id, Identities};

/// Unix time in milliseconds, as the feed writes times (expiry, revocation).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The identities the request path reads, swapped whole by the follower.
#[derive(Debug, Default)]
pub struct IdentityState {
    current: ArcSwapOption<Identities>,
    /// Unix ms of the last answer from the control plane (0: none yet).
    last_contact_ms: AtomicI64,
    /// Whether the current identities were restored from disk and not yet confirmed.
    restored: AtomicBool,
    /// Unix ms the stored snapshot (or its journal) was last written, when restored from it.
    stored_at_ms: AtomicI64,
    /// The control plane's clock less this gateway's, as last seen (0 until then): the times
    /// of keys (expiry, end of grace, revocation) are the control plane's.
    clock_offset_ms: AtomicI64,
}

impl IdentityState {
    /// The identities now, if any were ever loaded.
    pub fn current(&self) -> Option<Arc<Identities>> {
        self.current.load_full()
    }

    /// Runs `f` on the identities now, without touching their reference count.
    pub fn with_current<R>(&self, f: impl FnOnce(Option<&Identities>) -> R) -> R {
        let guard = self.current.load();
        f(guard.as_deref())
    }

    /// Replaces the identities.
    pub fn set(&self, identities: Identities, restored: bool) {
        self.restored.store(restored, Ordering::Relaxed);
        self.current.store(Some(Arc::new(identities)));
    }

    /// Records an answer from the control plane.
    pub fn contacted(&self, now_ms: i64) {
        self.last_contact_ms.store(now_ms, Ordering::Relaxed);
        self.restored.store(false, Ordering::Relaxed);
    }

    /// Notes the control plane's clock, `server_ms`, read from an answer received at `local_ms`
    /// by this gateway's clock.
    pub fn observe_clock(&self, server_ms: i64, local_ms: i64) {
        let offset = server_ms.saturating_sub(local_ms);
        let before = self.clock_offset_ms.swap(offset, Ordering::Relaxed);
        if offset.abs() > 1_000 && (offset - before).abs() > 1_000 {
            tracing::warn!(
                offset_ms = offset,
                "this gateway's clock and the control plane's differ by more than a second; key \
                 expiries and revocations follow the control plane's"
            );
        }
    }

    /// Unix ms now by the control plane's clock, as last seen: what the times of keys are
    /// compared with.
    pub fn control_plane_now_ms(&self, local_ms: i64) -> i64 {
        local_ms.saturating_add(self.clock_offset_ms.load(Ordering::Relaxed))
    }

    /// Unix ms of the last answer from the control plane, if any.
    pub fn last_contact_ms(&self) -> Option<i64> {
        Some(self.last_contact_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0)
    }

    /// Records when the restored identities were last written to disk.
    pub fn restored_from(&self, stored_at_ms: i64) {
        self.stored_at_ms.store(stored_at_ms, Ordering::Relaxed);
    }

    /// Unix ms the identities in use are known to be current as of: the last answer from the
    /// control plane, else the time the stored snapshot was last written.
    pub fn current_as_of_ms(&self) -> Option<i64> {
        self.last_contact_ms()
            .or_else(|| Some(self.stored_at_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0))
    }

    /// Whether the identities come from the stored snapshot, not yet confirmed.
    pub fn is_restored(&self) -> bool {
        self.restored.load(Ordering::Relaxed)
    }
}

/// An authenticated caller, as the upstream is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The customer.
    pub customer: Id,
    /// The plan that applies.
    pub plan_id: Arc<str>,
    /// That plan: its limits and quota.
    pub plan: Arc<tollgate_model::plan::Plan>,
    /// The customer's billing period, which the quota counts in.
    pub billing_period: Option<tollgate_model::feed::PeriodMs>,
    /// The customer's id as a header value.
    pub customer_header: http::HeaderValue,
    /// The plan's id as a header value.
    pub plan_header: http::HeaderValue,
    /// The key used, for an API key.
    pub key: Option<Id>,
    /// The token's `sub`, for a JWT.
    pub subject: Option<Arc<str>>,
}

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credential the route accepts was sent (401); what to send.
    Missing(&'static str),
    /// Not a key: wrong prefix, length, alphabet or checksum (401, no lookup made).
    Malformed,
    /// The credential's header or query parameter sent more than once (400, nothing checked:
    /// which one counts is ambiguous); what to send instead.
    Repeated(&'static str),
    /// No such key (401).
    Unknown,
    /// Revoked, or past a rotation's grace (401).
    Revoked,
    /// Past its expiry (401).
    Expired,
    /// The customer of the key or token is suspended (403).
    Suspended,
    /// The key's scopes do not include the route (403).
    OutOfScope,
    /// This gateway has never had identities to check against (503).
    Unavailable,
    /// A JWT that does not verify (format, algorithm, key, signature); says why (401).
    InvalidToken(&'static str),
    /// A JWT naming a signing key (`kid`) the provider's keys do not hold, where it has no one
    /// key without a `kid` to check it with, or naming none where several could sign (401,
    /// answered as an invalid token). Not counted as a failed
    /// authentication: nothing was verified, so it guesses nothing, and a provider that has
    /// just rotated its keys (the gateway fetches them again, at most once per
    /// `jwks_min_refresh`) must not get its clients throttled.
    UnknownSigningKey(&'static str),
    /// A JWT whose signature verified but whose claims do not hold (`nbf`, `iss`, `aud`, a
    /// required claim); says why (401, answered as an invalid token).
    InvalidClaims(&'static str),
    /// A JWT past its `exp` (401).
    ExpiredToken,
    /// A valid JWT whose customer claim names no customer (403).
    UnknownCustomer,
}

impl Refusal {
    /// Whether it counts as a failed authentication of the client address: a credential that
    /// may be a guess (a key no one was given, or a token whose signature does not verify). A
    /// missing credential guesses nothing; a real key or a token whose signature verified, but
    /// which may not be used (revoked, expired, suspended, out of scope, claims that do not
    /// hold), is not a guess: presenting it again teaches nothing about other keys, and its
    /// caller keeps getting the reason.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Refusal::Malformed | Refusal::Unknown | Refusal::InvalidToken(_)
        )
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Missing(_) => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Repeated(_) => "repeated",
            Refusal::Unknown => "unknown",
            Refusal::Revoked => "revoked",
            Refusal::Expired => "expired",
            Refusal::Suspended => "suspended",
            Refusal::OutOfScope => "out-of-scope",
            Refusal::Unavailable => "unavailable",
            Refusal::InvalidToken(_)
            | Refusal::UnknownSigningKey(_)
            | Refusal::InvalidClaims(_) => "invalid-token",
            Refusal::ExpiredToken => "expired-token",
            Refusal::UnknownCustomer => "unknown-customer",
        }
    }
}

/// Checks an API key for `route` at `now_ms` (`None`: a customer's own usage view, which any
/// of its keys may read, whatever its scopes). A malformed key is refused before any lookup;
/// the lookup is by SHA-256, so its cost does not depend on how much of a real key a guess
/// shares.
pub fn check_key(
    identities: &Identities,
    key: &str,
    route: Option<&str>,
    now_ms: i64,
) -> Result<Caller, Refusal> {
    if !tollgate_model::key::is_well_formed(key) {
        return Err(Refusal::Malformed);
    }
    let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let entry = identities.key(&hash).ok_or(Refusal::Unknown)?;
    if now_ms >= entry.revoked_at_ms {
        return Err(Refusal::Revoked);
    }
    if now_ms >= entry.expires_at_ms {
        return Err(Refusal::Expired);
    }
    let customer = identities
        .customer(&entry.customer)
        .ok_or(Refusal::Unknown)?;
    if customer.status != CustomerStatus::Active {
        return Err(Refusal::Suspended);
    }
    if let (Some(scopes), Some(route)) = (&entry.scopes, route)
        && !scopes.iter().any(|scope| &**scope == route)
    {
        return Err(Refusal::OutOfScope);
    }
    // Every customer's plan is in the index (checked when it is built or changed).
    let plan = identities.plan(&customer.plan_id).ok_or(Refusal::Unknown)?;
    Ok(Caller {
        customer: entry.customer,
        plan_id: Arc::clone(&customer.plan_id),
        plan: Arc::clone(plan),
        billing_period: customer.billing_period,
        customer_header: customer.id_header.clone(),
        plan_header: customer.plan_header.clone(),
        key: Some(entry.id),
        subject: None,
    })
}

/// Checks a JWT with `verifier` and maps its customer claim to a customer.
pub fn check_jwt(
    identities: &Identities,
    verifier: &jwt::Verifier,
    token: &str,
) -> Result<Caller, Refusal> {
    let claims = verifier.verify(token)?;
    let id = index::parse_id("cus", &claims.customer).ok_or(Refusal::UnknownCustomer)?;
    let customer = identities.customer(&id).ok_or(Refusal::UnknownCustomer)?;
    if customer.status != CustomerStatus::Active {
        return Err(Refusal::Suspended);
    }
    let plan = identities
        .plan(&customer.plan_id)
        .ok_or(Refusal::UnknownCustomer)?;
    Ok(Caller {
        customer: id,
        plan_id: Arc::clone(&customer.plan_id),
        plan: Arc::clone(plan),
        billing_period: customer.billing_period,
        customer_header: customer.id_header.clone(),
        plan_header: customer.plan_header.clone(),
        key: None,
        subject: claims.subject.map(Arc::from),
    })
}
