//! JWT verification: the token's algorithm must be one the provider lists (all of one family,
//! so an HMAC token is never checked against a public key), its signature must verify with the
//! provider's key named by `kid` (or, for a `kid` no key is named by, its one key without a
//! `kid`), and `exp` (required), `nbf`, `iss` and `aud` must hold within the leeway. `alg: none`
//! is never accepted.
//!
//! JWKS keys are fetched and refreshed in the background ([`JwksRefresher`]). A token naming an
//! unknown `kid` asks for a refresh (and is refused unless a key without a `kid` verifies it),
//! which happens at most once per `jwks_min_refresh`: the request path never fetches anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::Refusal;
use crate::config::{JwtKeys, JwtProvider};

/// Least HMAC secret length accepted.
pub const MIN_SECRET_BYTES: usize = 32;

/// A provider's settings as text, to tell whether a reload changed them (the contents of key
/// files are not compared: changing a PEM file in place needs a restart, as documented).
pub fn describe(provider: &JwtProvider) -> String {
    let keys = match &provider.keys {
        JwtKeys::Jwks { url } => format!("jwks {url}"),
        JwtKeys::Secret { env } => format!("secret ${env}"),
        JwtKeys::Static(keys) => format!(
            "static {:?}",
            keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>()
        ),
    };
    format!(
        "{} {} {:?} {:?} {keys} {} {:?} {:?} {:?}",
        provider.name,
        provider.issuer,
        provider.audiences,
        provider.algorithms,
        provider.customer_claim,
        provider.leeway,
        provider.jwks_refresh,
        provider.jwks_min_refresh
    )
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The customer claim's value.
    pub customer: String,
    /// `sub`, if present.
    pub subject: Option<String>,
}

/// The keys of a JWKS document, with their `kid` (a document of one key may give it none).
#[derive(Debug)]
pub struct Jwks {
    url: String,
    keys: ArcSwap<Vec<(Option<String>, DecodingKey)>>,
    wanted: AtomicBool,
    notify: Notify,
    refresh: Duration,
    min_refresh: Duration,
}

impl Jwks {
    fn ask_for_refresh(&self) {
        if !self.wanted.swap(true, Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }
}

/// Where a provider's keys are.
#[derive(Debug)]
enum Keys {
    Secret(DecodingKey),
    Static(Vec<(Option<String>, DecodingKey)>),
    Jwks(Arc<Jwks>),
}

/// Checks the tokens of one provider.
#[derive(Debug)]
pub struct Verifier {
    /// The provider's name.
    pub name: String,
    validation: Validation,
    keys: Keys,
    customer_claim: String,
}

impl Verifier {
    /// A verifier for `provider`; reads an HMAC secret from its environment variable.
    pub fn new(provider: &JwtProvider, path: &str) -> anyhow::Result<Self> {
        let mut validation = Validation::new(provider.algorithms[0]);
        validation.algorithms = provider.algorithms.clone();
        validation.leeway = provider.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&provider.issuer]);
        validation.set_audience(&provider.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let keys = match &provider.keys {
            JwtKeys::Secret { env } => {
                let secret = std::env::var(env).map_err(|_| {
                    anyhow::anyhow!("{path}.secret_env: the environment variable {env} is not set")
                })?;
                if secret.len() < MIN_SECRET_BYTES {
                    anyhow::bail!(
                        "{path}.secret_env: {env} holds {} bytes; an HMAC secret needs at least \
                         {MIN_SECRET_BYTES}",
                        secret.len()
                    );
                }
                Keys::Secret(DecodingKey::from_secret(secret.as_bytes()))
            }
            JwtKeys::Static(keys) => Keys::Static(
                keys.iter()
                    .map(|k| (k.kid.clone(), k.key.clone()))
                    .collect(),
            ),
            JwtKeys::Jwks { url } => Keys::Jwks(Arc::new(Jwks {
                url: url.clone(),
                keys: ArcSwap::from_pointee(Vec::new()),
                wanted: AtomicBool::new(false),
                notify: Notify::new(),
                refresh: provider.jwks_refresh,
                min_refresh: provider.jwks_min_refresh,
            })),
        };
        Ok(Self {
            name: provider.name.clone(),
            validation,
            keys,
            customer_claim: provider.customer_claim.clone(),
        })
    }

    /// The JWKS this verifier reads, if any.
    pub fn jwks(&self) -> Option<Arc<Jwks>> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(Arc::clone(jwks)),
            _ => None,
        }
    }

    /// Checks `token`.
    pub fn verify(&self, token: &str) -> Result<Claims, Refusal> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Refusal::InvalidToken(unreadable_header(token)))?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(Refusal::InvalidToken("algorithm not accepted"));
        }
        // RFC 7515: a token naming an extension its recipient does not implement is invalid,
        // and this gateway implements none.
        if header.crit.is_some() {
            return Err(Refusal::InvalidToken(
                "the header names critical extensions (crit), which are not supported",
            ));
        }
        let jwks_keys;
        let picked = match &self.keys {
            Keys::Secret(key) => Picked::Named(key),
            Keys::Static(keys) => pick(
                keys.iter().map(|(kid, key)| (kid.as_deref(), key)),
                header.kid.as_deref(),
            )?,
            Keys::Jwks(jwks) => {
                jwks_keys = jwks.keys.load();
                pick(
                    jwks_keys.iter().map(|(kid, key)| (kid.as_deref(), key)),
                    header.kid.as_deref(),
                )
                .inspect_err(|_| jwks.ask_for_refresh())?
            }
        };
        let (key, named) = match picked {
            Picked::Named(key) => (key, true),
            Picked::WithoutKid(key) => (key, false),
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
            .map_err(|error| {
                // Checked with the key without a kid for a token naming another: the key it
                // names may be one a JWKS has gained since.
                if let (false, Keys::Jwks(jwks)) = (named, &self.keys) {
                    jwks.ask_for_refresh();
                }
                match error.kind() {
                    // Still counted as a failed authentication (a signature was checked and
                    // failed), so a made-up kid buys no unthrottled checks.
                    ErrorKind::InvalidSignature if !named => Refusal::InvalidToken(
                        "signature does not verify with the key without a kid",
                    ),
                    ErrorKind::ExpiredSignature => Refusal::ExpiredToken,
                    ErrorKind::ImmatureSignature => Refusal::InvalidClaims("not valid yet (nbf)"),
                    ErrorKind::InvalidIssuer => Refusal::InvalidClaims("issuer not accepted"),
                    ErrorKind::InvalidAudience => Refusal::InvalidClaims("audience not accepted"),
                    ErrorKind::MissingRequiredClaim(claim)
                    | ErrorKind::InvalidClaimFormat(claim) => {
                        Refusal::InvalidClaims(claim_problem(claim))
                    }
                    ErrorKind::InvalidAlgorithm => Refusal::InvalidToken("algorithm not accepted"),
                    ErrorKind::InvalidSignature => {
                        Refusal::InvalidToken("signature does not verify")
                    }
                    _ => Refusal::InvalidToken("malformed token"),
                }
            })?;
        let customer = match data.claims.get(&self.customer_claim) {
            Some(Value::String(customer)) => customer.clone(),
            Some(_) => return Err(Refusal::InvalidClaims("the customer claim is not a string")),
            None => return Err(Refusal::InvalidClaims("the customer claim is missing")),
        };
        let subject = data
            .claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Claims { customer, subject })
    }
}

/// Why a token's header does not read: `alg: none` is told as such.
fn unreadable_header(token: &str) -> &'static str {
    use base64::Engine;
    let header = token
        .split('.')
        .next()
        .and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<Map<String, Value>>(&json).ok());
    let Some(header) = header else {
        return "not a JWT";
    };
    match header.get("alg").and_then(Value::as_str) {
        Some(alg) if alg.eq_ignore_ascii_case("none") => "alg none is never accepted",
        Some(alg) if alg.parse::<jsonwebtoken::Algorithm>().is_err() => "algorithm not accepted",
        _ => "the header is malformed",
    }
}

/// What is wrong with a registered claim that is missing or not of its type.
fn claim_problem(claim: &str) -> &'static str {
    match claim {
        "exp" => "exp is missing or not a number of seconds",
        "nbf" => "nbf is not a number of seconds",
        "iss" => "iss is missing or not a string",
        "aud" => "aud is missing or not a string or list of strings",
        _ => "a required claim is missing",
    }
}

/// The key a token is checked with.
#[derive(Debug)]
enum Picked<'a> {
    /// The key the token names by its `kid`, or the only key for a token naming none.
    Named(&'a DecodingKey),
    /// The provider's one key without a `kid`, for a token naming a `kid` no key is named by (as
    /// Envoy does: identity providers often name a key in every token, while a key configured
    /// by hand often has no name).
    WithoutKid(&'a DecodingKey),
}

/// The key to check a token naming `kid` with, among `keys`.
fn pick<'a>(
    keys: impl Iterator<Item = (Option<&'a str>, &'a DecodingKey)> + Clone,
    kid: Option<&str>,
) -> Result<Picked<'a>, Refusal> {
    match kid {
        Some(kid) => {
            if let Some((_, key)) = keys.clone().find(|(candidate, _)| *candidate == Some(kid)) {
                return Ok(Picked::Named(key));
            }
            only(keys.filter(|(candidate, _)| candidate.is_none()))
                .map(|(_, key)| Picked::WithoutKid(key))
                .ok_or(Refusal::UnknownSigningKey("unknown key id (kid)"))
        }
        None => only(keys)
            .map(|(_, key)| Picked::Named(key))
            .ok_or(Refusal::UnknownSigningKey(
                "the token names no key id (kid)",
            )),
    }
}

/// The one item of `items`, if it has exactly one.
fn only<T>(mut items: impl Iterator<Item = T>) -> Option<T> {
    match (items.next(), items.next()) {
        (Some(item), None) => Some(item),
        _ => None,
    }
}

/// Fetches every JWKS in the background: at start, every `jwks_refresh`, and when a token names
/// an unknown `kid` (at most once per `jwks_min_refresh`).
#[derive(Debug)]
pub struct JwksRefresher {
    jwks: Vec<(String, Arc<Jwks>)>,
    client: reqwest::Client,
    metrics: crate::metrics::Metrics,
}

impl JwksRefresher {
    /// Refreshes the JWKS of these verifiers.
    pub fn new(
        verifiers: &[Arc<Verifier>],
        metrics: crate::metrics::Metrics,
    ) -> anyhow::Result<Option<Self>> {
        let jwks: Vec<_> = verifiers
            .iter()
            .filter_map(|v| v.jwks().map(|jwks| (v.name.clone(), jwks)))
            .collect();
        if jwks.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Some(Self {
            jwks,
            client,
            metrics,
        }))
    }

    async fn keep_fresh(&self, name: &str, jwks: &Jwks) {
        let mut last: Option<Instant> = None;
        loop {
            if let Some(last) = last {
                let next_regular = last + jwks.refresh;
                tokio::select! {
                    () = tokio::time::sleep_until(next_regular.into()) => {}
                    () = jwks.notify.notified() => {
                        let earliest = last + jwks.min_refresh;
                        tokio::time::sleep_until(earliest.into()).await;
                    }
                }
            }
            jwks.wanted.store(false, Ordering::Relaxed);
            last = Some(Instant::now());
            match self.fetch(&jwks.url).await {
                Ok(keys) => {
                    tracing::debug!(provider = name, keys = keys.len(), "JWKS fetched");
                    jwks.keys.store(Arc::new(keys));
                    self.metrics.jwks_fetch(name, true);
                }
                Err(error) => {
                    tracing::warn!(provider = name, %error, "cannot fetch the JWKS; the keys in use stay");
                    self.metrics.jwks_fetch(name, false);
                }
            }
        }
    }

    async fn fetch(&self, url: &str) -> anyhow::Result<Vec<(Option<String>, DecodingKey)>> {
        let set: JwkSet = self
            .client
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            // Keys for encryption (or another use) never check a signature.
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
            {
                continue;
            }
            let kid = jwk.common.key_id.clone();
            // Keys without a kid are all kept: with more than one, tokens naming none (or an
            // unknown kid) are refused rather than checked with whichever came first.
            if kid.is_some() && keys.iter().any(|(known, _)| *known == kid) {
                tracing::warn!(
                    kid = kid.as_deref(),
                    "skipping a JWKS key whose kid is taken"
                );
                continue;
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => keys.push((kid, key)),
                Err(error) => {
                    tracing::warn!(kid = kid.as_deref(), %error, "skipping a JWKS key");
                }
            }
        }
        Ok(keys)
    }
}

#[async_trait]
impl BackgroundService for JwksRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let all = futures_util::future::join_all(
            self.jwks
                .iter()
                .map(|(name, jwks)| self.keep_fresh(name, jwks)),
        );
        tokio::select! {
            _ = all => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(secret: &[u8]) -> DecodingKey {
        DecodingKey::from_secret(secret)
    }

    /// Which of `keys` `pick` chose for `kid`, by position, and whether the token named it.
    fn picked(keys: &[(Option<&str>, DecodingKey)], kid: Option<&str>) -> Option<(usize, bool)> {
        let chosen = pick(keys.iter().map(|(kid, key)| (*kid, key)), kid).ok()?;
        let (chosen, named) = match chosen {
            Picked::Named(key) => (key, true),
            Picked::WithoutKid(key) => (key, false),
        };
        let index = keys.iter().position(|(_, key)| std::ptr::eq(key, chosen))?;
        Some((index, named))
    }

    #[test]
    fn a_named_key_wins_and_the_one_without_a_kid_takes_unknown_kids() {
        let keys = [(Some("k1"), key(b"one")), (None, key(b"two"))];
        assert_eq!(picked(&keys, Some("k1")), Some((0, true)));
        assert_eq!(picked(&keys, Some("k9")), Some((1, false)));
        // Two keys: a token naming none could be either's.
        assert_eq!(picked(&keys, None), None);
    }

    #[test]
    fn the_only_key_checks_a_token_naming_none() {
        assert_eq!(picked(&[(None, key(b"one"))], None), Some((0, true)));
        assert_eq!(picked(&[(Some("k1"), key(b"one"))], None), Some((0, true)));
    }

    #[test]
    fn an_unknown_kid_is_refused_without_exactly_one_key_without_a_kid() {
        let named = [(Some("k1"), key(b"one")), (Some("k2"), key(b"two"))];
        assert_eq!(picked(&named, Some("k9")), None);
        let two_unnamed = [(None, key(b"one")), (None, key(b"two"))];
        assert_eq!(picked(&two_unnamed, Some("k9")), None);
        assert_eq!(picked(&two_unnamed, None), None);
        assert!(matches!(
            pick(named.iter().map(|(kid, key)| (*kid, key)), Some("k9")),
            Err(Refusal::UnknownSigningKey(_))
        ));
    }
}
