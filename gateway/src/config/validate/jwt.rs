//! Checks of `[[jwt_providers]]`: one key source, algorithms of the family that source allows
//! (so an HMAC token can never be checked against a public key), keys that parse, a leeway
//! of at most a minute, and an HMAC secret of at least 32 bytes where its variable is set.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use super::{Errors, check_name};
use crate::config::file::JwtProviderConfig;
use crate::config::{JwtKeys, JwtProvider, StaticKey};
use crate::identity::jwt::MIN_SECRET_BYTES;

/// The largest clock skew a provider may allow.
const MAX_LEEWAY: Duration = Duration::from_secs(60);
/// The shortest interval between two fetches of a JWKS.
const MIN_JWKS_REFRESH: Duration = Duration::from_secs(1);

pub(super) fn provider(
    file: &JwtProviderConfig,
    path: &str,
    base: &Path,
    errors: &mut Errors,
) -> Option<JwtProvider> {
    let before = errors.0.len();
    check_name(&file.name, &format!("{path}.name"), errors);
    if file.issuer.is_empty() {
        errors.push(format!("{path}.issuer"), "must not be empty");
    }
    if file.audiences.is_empty() || file.audiences.iter().any(String::is_empty) {
        errors.push(
            format!("{path}.audiences"),
            "must list the audience values (aud) this gateway accepts",
        );
    }
    if file.customer_claim.is_empty() {
        errors.push(format!("{path}.customer_claim"), "must not be empty");
    }
    if file.leeway > MAX_LEEWAY {
        errors.push(format!("{path}.leeway"), "must be at most 60s");
    }
    // Zero would fetch in a loop, or on every burst of tokens naming an unknown kid.
    if file.jwks_refresh < MIN_JWKS_REFRESH {
        errors.push(format!("{path}.jwks_refresh"), "must be at least 1s");
    }
    if file.jwks_min_refresh < MIN_JWKS_REFRESH {
        errors.push(format!("{path}.jwks_min_refresh"), "must be at least 1s");
    } else if file.jwks_min_refresh > file.jwks_refresh {
        errors.push(
            format!("{path}.jwks_min_refresh"),
            "must not be longer than jwks_refresh",
        );
    }
    let algorithms = algorithms(file, path, errors);
    let family = algorithms.first().map(|a| a.family());
    let sources = usize::from(file.jwks_url.is_some())
        + usize::from(!file.public_keys.is_empty())
        + usize::from(file.secret_env.is_some());
    if sources != 1 {
        errors.push(
            path,
            "set exactly one of jwks_url, public_keys or secret_env",
        );
        return None;
    }
    let hmac = family == Some(AlgorithmFamily::Hmac);
    let keys = if let Some(url) = &file.jwks_url {
        if hmac {
            errors.push(
                format!("{path}.algorithms"),
                "HS* tokens are checked with secret_env, not with public keys",
            );
        }
        match url.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {}
            // Keys fetched in the clear could be swapped on the way: plain HTTP only on the
            // loopback interface.
            Ok(uri)
                if uri.scheme_str() == Some("http")
                    && matches!(uri.host(), Some("127.0.0.1" | "localhost" | "[::1]")) => {}
            _ => errors.push(
                format!("{path}.jwks_url"),
                format!("{url:?} must be an https:// URL (http:// only on the loopback interface)"),
            ),
        }
        JwtKeys::Jwks { url: url.clone() }
    } else if let Some(env) = &file.secret_env {
        if !hmac && family.is_some() {
            errors.push(
                format!("{path}.algorithms"),
                "a secret checks HS256, HS384 or HS512 only",
            );
        }
        if env.is_empty() {
            errors.push(format!("{path}.secret_env"), "must name a variable");
        } else if super::check_variable_name(env, &format!("{path}.secret_env"), errors)
            && let Ok(secret) = std::env::var(env)
            && secret.len() < MIN_SECRET_BYTES
        {
            // Checked here too, not only at start, so that `--validate` in the gateway's
            // environment tells. (Unset here, it may be set where the gateway runs.)
            errors.push(
                format!("{path}.secret_env"),
                format!(
                    "{env} holds {} bytes; an HMAC secret needs at least {MIN_SECRET_BYTES}",
                    secret.len()
                ),
            );
        }
        JwtKeys::Secret { env: env.clone() }
    } else {
        if hmac {
            errors.push(
                format!("{path}.algorithms"),
                "HS* tokens are checked with secret_env, not with public keys",
            );
        }
        let several = file.public_keys.len() > 1;
        let keys = file
            .public_keys
            .iter()
            .enumerate()
            .filter_map(|(i, key)| {
                let key_path = format!("{path}.public_keys[{i}]");
                if several && key.kid.is_none() {
                    errors.push(
                        format!("{key_path}.kid"),
                        "is required when there are several keys",
                    );
                }
                let file_path = base.join(&key.file);
                let pem = match std::fs::read(&file_path) {
                    Ok(pem) => pem,
                    Err(error) => {
                        errors.push(
                            format!("{key_path}.file"),
                            format!("cannot read {}: {error}", file_path.display()),
                        );
                        return None;
                    }
                };
                let (decoded, kind) = match family? {
                    AlgorithmFamily::Rsa => (DecodingKey::from_rsa_pem(&pem), "an RSA public key"),
                    AlgorithmFamily::Ec => (
                        DecodingKey::from_ec_pem(&pem),
                        "an EC public key (P-256 for ES256, P-384 for ES384)",
                    ),
                    AlgorithmFamily::Ed => {
                        (DecodingKey::from_ed_pem(&pem), "an Ed25519 public key")
                    }
                    AlgorithmFamily::Hmac => return None,
                };
                match decoded {
                    Ok(decoded) => Some(StaticKey {
                        kid: key.kid.clone(),
                        key: decoded,
                    }),
                    Err(error) => {
                        // A key of another kind reads as `InvalidKeyFormat`: say which it takes.
                        let why = match error.kind() {
                            jsonwebtoken::errors::ErrorKind::InvalidKeyFormat => {
                                format!("{:?} takes {kind}", algorithms[0])
                            }
                            _ => error.to_string(),
                        };
                        errors.push(
                            format!("{key_path}.file"),
                            format!(
                                "{} is not a PEM public key for {:?}: {why}",
                                file_path.display(),
                                algorithms[0],
                            ),
                        );
                        None
                    }
                }
            })
            .collect();
        JwtKeys::Static(keys)
    };
    (errors.0.len() == before).then(|| JwtProvider {
        name: file.name.clone(),
        issuer: file.issuer.clone(),
        audiences: file.audiences.clone(),
        algorithms,
        keys,
        customer_claim: file.customer_claim.clone(),
        leeway: file.leeway,
        jwks_refresh: file.jwks_refresh,
        jwks_min_refresh: file.jwks_min_refresh,
    })
}

fn algorithms(file: &JwtProviderConfig, path: &str, errors: &mut Errors) -> Vec<Algorithm> {
    if file.algorithms.is_empty() {
        errors.push(
            format!("{path}.algorithms"),
            "must list the accepted algorithms, such as [\"RS256\"]",
        );
    }
    let parsed: Vec<Algorithm> = file
        .algorithms
        .iter()
        .enumerate()
        .filter_map(|(i, name)| match Algorithm::from_str(name) {
            Ok(algorithm) => Some(algorithm),
            Err(_) => {
                errors.push(
                    format!("{path}.algorithms[{i}]"),
                    format!(
                        "unknown algorithm {name:?}: use HS256/384/512, RS256/384/512, \
                         PS256/384/512, ES256/384 or EdDSA (never \"none\")"
                    ),
                );
                None
            }
        })
        .collect();
    if parsed.windows(2).any(|w| w[0].family() != w[1].family()) {
        errors.push(
            format!("{path}.algorithms"),
            "mixes algorithm families: one provider checks either HMAC or one kind of public key",
        );
    }
    parsed
}
