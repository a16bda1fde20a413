//! Security headers: defaults, per-route overrides, and header name/value checks.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};

use super::SecurityHeaders;
use super::file::SecurityHeadersConfig;
use super::validate::Errors;

const DEFAULT_HSTS: &str = "max-age=31536000; includeSubDomains";
const DEFAULT_CONTENT_TYPE_OPTIONS: &str = "nosniff";
const DEFAULT_FRAME_OPTIONS: &str = "DENY";
const DEFAULT_REFERRER_POLICY: &str = "no-referrer";
const DEFAULT_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Checks every value of a security-headers table.
pub(super) fn check_security_headers(
    file: &SecurityHeadersConfig,
    path: &str,
    errors: &mut Errors,
) {
    for (field, value) in [
        ("strict_transport_security", &file.strict_transport_security),
        ("content_type_options", &file.content_type_options),
        ("frame_options", &file.frame_options),
        ("referrer_policy", &file.referrer_policy),
        ("content_security_policy", &file.content_security_policy),
    ] {
        if let Some(value) = value {
            header_value(value, &format!("{path}.{field}"), errors);
        }
    }
    header_pairs(&file.extra, &format!("{path}.extra"), errors);
}

/// Resolves layers of security-header tables (defaults, then global, then route).
///
/// Later layers override earlier ones, field by field; an empty value removes the header.
pub(super) fn resolve_security_headers(layers: &[&SecurityHeadersConfig]) -> SecurityHeaders {
    let pick = |get: fn(&SecurityHeadersConfig) -> &Option<String>, default: &str| {
        let value = layers
            .iter()
            .rev()
            .find_map(|layer| get(layer).clone())
            .unwrap_or_else(|| default.to_owned());
        (!value.is_empty())
            .then(|| HeaderValue::from_str(&value).ok())
            .flatten()
    };
    let enabled = layers
        .iter()
        .rev()
        .find_map(|layer| layer.enabled)
        .unwrap_or(true);
    if !enabled {
        return SecurityHeaders::default();
    }
    let mut always = Vec::new();
    for (name, value) in [
        (
            "x-content-type-options",
            pick(|l| &l.content_type_options, DEFAULT_CONTENT_TYPE_OPTIONS),
        ),
        (
            "x-frame-options",
            pick(|l| &l.frame_options, DEFAULT_FRAME_OPTIONS),
        ),
        (
            "referrer-policy",
            pick(|l| &l.referrer_policy, DEFAULT_REFERRER_POLICY),
        ),
    ] {
        if let Some(value) = value {
            always.push((HeaderName::from_static(name), value));
        }
    }
    let mut extra: BTreeMap<String, String> = BTreeMap::new();
    for layer in layers {
        for (name, value) in &layer.extra {
            extra.insert(name.to_ascii_lowercase(), value.clone());
        }
    }
    for (name, value) in extra {
        if value.is_empty() {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            always.push((name, value));
        }
    }
    SecurityHeaders {
        always,
        hsts: pick(|l| &l.strict_transport_security, DEFAULT_HSTS),
        csp: pick(|l| &l.content_security_policy, DEFAULT_CSP),
    }
}

pub(super) fn header_value(value: &str, path: &str, errors: &mut Errors) -> Option<HeaderValue> {
    match HeaderValue::from_str(value) {
        Ok(value) => Some(value),
        Err(_) => {
            errors.push(path, format!("invalid header value {value:?}"));
            None
        }
    }
}

pub(super) fn header_pairs(
    map: &BTreeMap<String, String>,
    path: &str,
    errors: &mut Errors,
) -> Vec<(HeaderName, HeaderValue)> {
    map.iter()
        .filter_map(|(name, value)| {
            let header_path = format!("{path}.{name}");
            let parsed_name = match HeaderName::from_bytes(name.as_bytes()) {
                Ok(parsed) => Some(parsed),
                Err(_) => {
                    errors.push(&header_path, format!("invalid header name {name:?}"));
                    None
                }
            };
            let parsed_value = header_value(value, &header_path, errors);
            parsed_name.zip(parsed_value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(headers: &SecurityHeaders) -> Vec<(String, String)> {
        headers
            .always
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let resolved = resolve_security_headers(&[&SecurityHeadersConfig::default()]);
        assert_eq!(
            names(&resolved),
            vec![
                ("x-content-type-options".into(), "nosniff".into()),
                ("x-frame-options".into(), "DENY".into()),
                ("referrer-policy".into(), "no-referrer".into()),
            ]
        );
        assert_eq!(resolved.hsts.unwrap(), DEFAULT_HSTS);
        assert_eq!(resolved.csp.unwrap(), DEFAULT_CSP);
    }

    #[test]
    fn later_layers_override_and_empty_values_remove() {
        let global = SecurityHeadersConfig {
            frame_options: Some("SAMEORIGIN".into()),
            extra: BTreeMap::from([("Permissions-Policy".into(), "camera=()".into())]),
            ..SecurityHeadersConfig::default()
        };
        let route = SecurityHeadersConfig {
            referrer_policy: Some(String::new()),
            strict_transport_security: Some(String::new()),
            extra: BTreeMap::from([("permissions-policy".into(), "camera=(self)".into())]),
            ..SecurityHeadersConfig::default()
        };
        let resolved = resolve_security_headers(&[&global, &route]);
        assert_eq!(
            names(&resolved),
            vec![
                ("x-content-type-options".into(), "nosniff".into()),
                ("x-frame-options".into(), "SAMEORIGIN".into()),
                ("permissions-policy".into(), "camera=(self)".into()),
            ]
        );
        assert!(resolved.hsts.is_none());
    }

    #[test]
    fn disabled_means_none_at_all() {
        let route = SecurityHeadersConfig {
            enabled: Some(false),
            ..SecurityHeadersConfig::default()
        };
        let resolved = resolve_security_headers(&[&SecurityHeadersConfig::default(), &route]);
        assert!(resolved.always.is_empty() && resolved.hsts.is_none() && resolved.csp.is_none());
    }

    #[test]
    fn invalid_names_and_values_are_reported_with_their_paths() {
        let mut errors = Errors::default();
        let table = SecurityHeadersConfig {
            frame_options: Some("bad\nvalue".into()),
            extra: BTreeMap::from([("bad name".into(), "x".into())]),
            ..SecurityHeadersConfig::default()
        };
        check_security_headers(&table, "security_headers", &mut errors);
        let messages: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            vec![
                "security_headers.frame_options: invalid header value \"bad\\nvalue\"",
                "security_headers.extra.bad name: invalid header name \"bad name\"",
            ]
        );
    }
}
