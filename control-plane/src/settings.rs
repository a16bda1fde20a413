//! Settings from the environment, checked at start with a message naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

/// Where the store lives when `DATABASE_URL` is not set: a SQLite file created on first start.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://tollgate.db?mode=rwc";
/// The admin API's address when `CONTROL_PLANE_LISTEN` is not set.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9100";
/// The shortest first-admin token accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;
/// Days raw usage events are kept when `TOLLGATE_USAGE_RETENTION_DAYS` is not set: two months.
pub const DEFAULT_USAGE_RETENTION_DAYS: u64 = 62;
/// The shortest retention accepted: a billing period (at most 31 days) and a few days of late
/// batches, so that a period's quota can always be rebuilt from its raw events.
pub const MIN_USAGE_RETENTION_DAYS: u64 = 35;
/// The longest retention accepted: ten years.
pub const MAX_USAGE_RETENTION_DAYS: u64 = 3650;

/// Checked settings.
#[derive(Clone)]
pub struct Settings {
    /// `DATABASE_URL`: `sqlite://...` or `postgres://...`.
    pub database_url: String,
    /// `CONTROL_PLANE_LISTEN`.
    pub listen: SocketAddr,
    /// `TOLLGATE_ADMIN_TOKEN`: the first admin's token, if given.
    pub admin_token: Option<String>,
    /// `TOLLGATE_USAGE_RETENTION_DAYS`: how long raw usage events are kept.
    pub usage_retention: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("listen", &self.listen)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("usage_retention", &self.usage_retention)
            .finish()
    }
}

/// A setting that is missing, weak or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    /// The environment variable.
    pub variable: &'static str,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.variable, self.message)
    }
}

impl std::error::Error for SettingsError {}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, Vec<SettingsError>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests); returns every problem.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Vec<SettingsError>> {
        let mut errors = Vec::new();
        let database_url =
            lookup("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            errors.push(SettingsError {
                variable: "DATABASE_URL",
                message: format!(
                    "{:?} is not a sqlite:// or postgres:// URL",
                    redact_url(&database_url)
                ),
            });
        }
        let listen_text =
            lookup("CONTROL_PLANE_LISTEN").unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text
            .parse::<SocketAddr>()
            .map_err(|_| SettingsError {
                variable: "CONTROL_PLANE_LISTEN",
                message: format!("{listen_text:?} is not an address like \"127.0.0.1:9100\""),
            });
        let admin_token = match admin_token(lookup("TOLLGATE_ADMIN_TOKEN")) {
            Ok(token) => token,
            Err(error) => {
                errors.push(error);
                None
            }
        };
        let usage_retention = match usage_retention(lookup("TOLLGATE_USAGE_RETENTION_DAYS")) {
            Ok(retention) => retention,
            Err(error) => {
                errors.push(error);
                Duration::ZERO
            }
        };
        match (listen, errors.is_empty()) {
            (Ok(listen), true) => Ok(Self {
                database_url,
                listen,
                admin_token,
                usage_retention,
            }),
            (listen, _) => {
                errors.extend(listen.err());
                Err(errors)
            }
        }
    }
}

/// Checks `TOLLGATE_ADMIN_TOKEN` (given as `value`): at least 32 characters, no spaces or
/// control characters. The gateway's embedded control plane applies the same rule.
pub fn admin_token(value: Option<String>) -> Result<Option<String>, SettingsError> {
    let Some(token) = value else {
        return Ok(None);
    };
    let message = if token.len() < MIN_ADMIN_TOKEN_LEN {
        format!(
            "too weak: {} characters, at least {MIN_ADMIN_TOKEN_LEN} are required",
            token.len()
        )
    } else if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "must not contain spaces or control characters".to_owned()
    } else {
        return Ok(Some(token));
    };
    Err(SettingsError {
        variable: "TOLLGATE_ADMIN_TOKEN",
        message,
    })
}

/// Checks `TOLLGATE_USAGE_RETENTION_DAYS` (given as `value`): whole days from
/// [`MIN_USAGE_RETENTION_DAYS`] to [`MAX_USAGE_RETENTION_DAYS`], default
/// [`DEFAULT_USAGE_RETENTION_DAYS`]. The gateway's embedded control plane applies the same rule.
pub fn usage_retention(value: Option<String>) -> Result<Duration, SettingsError> {
    let days = match value.as_deref().map(str::trim) {
        None => DEFAULT_USAGE_RETENTION_DAYS,
        Some(text) => match text.parse::<u64>() {
            Ok(days) if (MIN_USAGE_RETENTION_DAYS..=MAX_USAGE_RETENTION_DAYS).contains(&days) => {
                days
            }
            Ok(days) if days < MIN_USAGE_RETENTION_DAYS => {
                return Err(SettingsError {
                    variable: "TOLLGATE_USAGE_RETENTION_DAYS",
                    message: format!(
                        "{days} days is too short: at least {MIN_USAGE_RETENTION_DAYS} are \
                         required so a billing period's events are there to rebuild its quota"
                    ),
                });
            }
            _ => {
                return Err(SettingsError {
                    variable: "TOLLGATE_USAGE_RETENTION_DAYS",
                    message: format!(
                        "{text:?} is not a number of days from {MIN_USAGE_RETENTION_DAYS} to \
                         {MAX_USAGE_RETENTION_DAYS}"
                    ),
                });
            }
        },
    };
    Ok(Duration::from_secs(days * 86_400))
}

/// The URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, Vec<SettingsError>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_to_an_embedded_sqlite_store() {
        let settings = settings(&[]).unwrap();
        assert_eq!(settings.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(settings.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(settings.admin_token.is_none());
        assert_eq!(settings.usage_retention, Duration::from_secs(62 * 86_400));
    }

    #[test]
    fn usage_retention_is_whole_days_from_35_to_3650() {
        let retention = |value: &str| {
            settings(&[("TOLLGATE_USAGE_RETENTION_DAYS", value)])
                .map(|s| s.usage_retention)
                .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(retention("35"), Ok(Duration::from_secs(35 * 86_400)));
        assert_eq!(retention(" 3650 "), Ok(Duration::from_secs(3650 * 86_400)));
        assert_eq!(
            retention("34"),
            Err(vec![
                "TOLLGATE_USAGE_RETENTION_DAYS: 34 days is too short: at least 35 are required \
                 so a billing period's events are there to rebuild its quota"
                    .to_owned()
            ])
        );
        for bad in ["3651", "-1", "62d", "", "1e3"] {
            assert_eq!(
                retention(bad),
                Err(vec![format!(
                    "TOLLGATE_USAGE_RETENTION_DAYS: {:?} is not a number of days from 35 to 3650",
                    bad.trim()
                )]),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_every_bad_setting() {
        let errors = settings(&[
            ("DATABASE_URL", "mysql://u:secret@db/x"),
            ("CONTROL_PLANE_LISTEN", "everywhere"),
            ("TOLLGATE_ADMIN_TOKEN", "short"),
        ])
        .unwrap_err();
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            vec![
                "DATABASE_URL: \"mysql://u:***@db/x\" is not a sqlite:// or postgres:// URL",
                "TOLLGATE_ADMIN_TOKEN: too weak: 5 characters, at least 32 are required",
                "CONTROL_PLANE_LISTEN: \"everywhere\" is not an address like \"127.0.0.1:9100\"",
            ]
        );
    }

    #[test]
    fn debug_never_prints_the_token_or_password() {
        let settings = settings(&[
            ("DATABASE_URL", "postgres://admin:hunter2@127.0.0.1/db"),
            (
                "TOLLGATE_ADMIN_TOKEN",
                "0123456789abcdef0123456789abcdef-secret",
            ),
        ])
        .unwrap();
        let printed = format!("{settings:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains("-secret"),
            "{printed}"
        );
    }
}
