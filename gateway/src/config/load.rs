//! Reading `gateway.toml` and reporting every problem in it at once.
//!
//! serde stops at the first error, so the file is first parsed as a plain TOML table and each
//! section (and each element of `upstreams` and `routes`) is deserialized on its own; their errors
//! are collected with their field paths, then [`super::validate`] adds the semantic ones.

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::file::{
    AuthConfig, Entry, GatewayConfig, LogConfig, MeteringConfig, SecurityHeadersConfig,
    ServerConfig,
};

/// One problem in a config file, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted field path such as `routes[2].upstream`; empty for the file as a whole.
    pub path: String,
    /// What is wrong, in lowercase.
    pub message: String,
}

impl ConfigError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads the file at `path` and parses it as far as it goes (see [`parse`]).
pub fn read_file(path: &Path) -> Result<(String, GatewayConfig, Vec<ConfigError>), ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read {}: {error}", path.display()),
        )])
    })?;
    let (file, errors) = parse(&text)?;
    Ok((text, file, errors))
}

/// Parses config text into its file types. Only a TOML syntax error stops it; every other problem
/// (unknown keys, wrong types) is returned beside what could be read, section by section and
/// element by element.
pub fn parse(text: &str) -> Result<(GatewayConfig, Vec<ConfigError>), ConfigErrors> {
    let table: toml::Table = toml::from_str(text).map_err(|error| {
        let message = error.message().to_owned();
        let at = error
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                format!(" (line {line})")
            })
            .unwrap_or_default();
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("not valid TOML{at}: {message}"),
        )])
    })?;

    let mut errors = Vec::new();
    let mut config = GatewayConfig {
        server: None,
        log: LogConfig::default(),
        security_headers: SecurityHeadersConfig::default(),
        cors: None,
        upstreams: Vec::new(),
        routes: Vec::new(),
        control_plane: None,
        auth: AuthConfig::default(),
        metering: MeteringConfig::default(),
        redis: None,
        jwt_providers: Vec::new(),
    };
    let mut saw_server = false;
    for (key, value) in table {
        match key.as_str() {
            "server" => {
                saw_server = true;
                config.server = section::<ServerConfig>("server", value, &mut errors);
            }
            "log" => {
                config.log = section("log", value, &mut errors).unwrap_or_default();
            }
            "security_headers" => {
                config.security_headers =
                    section("security_headers", value, &mut errors).unwrap_or_default();
            }
            "control_plane" => {
                config.control_plane = section("control_plane", value, &mut errors);
            }
            "cors" => config.cors = section("cors", value, &mut errors),
            "auth" => config.auth = section("auth", value, &mut errors).unwrap_or_default(),
            "redis" => config.redis = section("redis", value, &mut errors),
            "metering" => {
                config.metering = section("metering", value, &mut errors).unwrap_or_default();
            }
            "jwt_providers" => config.jwt_providers = array("jwt_providers", value, &mut errors),
            "upstreams" => config.upstreams = array("upstreams", value, &mut errors),
            "routes" => config.routes = array("routes", value, &mut errors),
            _ => errors.push(ConfigError::new(
                key.clone(),
                "unknown key (expected one of server, log, security_headers, cors, control_plane, \
                 auth, metering, redis, jwt_providers, upstreams, routes)",
            )),
        }
    }
    if !saw_server {
        errors.push(ConfigError::new("server", "missing table [server]"));
    }
    Ok((config, errors))
}

fn section<T: DeserializeOwned>(
    path: &str,
    value: toml::Value,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    // Unknown keys are collected, not fatal, so that the other problems of the section are
    // still found; they are errors all the same.
    let mut unknown = Vec::new();
    let mut record = |key: serde_ignored::Path<'_>| {
        unknown.push(field_path(path, &key.to_string()));
    };
    let ignored = serde_ignored::Deserializer::new(value, &mut record);
    let parsed = match serde_path_to_error::deserialize::<_, T>(ignored) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            errors.push(ConfigError::new(
                field_path(path, &error.path().to_string()),
                describe(error.inner()),
            ));
            None
        }
    };
    for key in unknown {
        errors.push(ConfigError::new(key, "unknown key"));
    }
    parsed
}

/// `section` and a path inside it (`tls.0.cert`) as one field path (`server.tls[0].cert`).
fn field_path(section: &str, inner: &str) -> String {
    let mut full = section.to_owned();
    for segment in inner.split('.').filter(|s| !s.is_empty() && *s != "?") {
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            full.push_str(&format!("[{segment}]"));
        } else if full.is_empty() {
            full.push_str(segment);
        } else {
            full.push('.');
            full.push_str(segment);
        }
    }
    full
}

fn array<T: DeserializeOwned>(
    path: &str,
    value: toml::Value,
    errors: &mut Vec<ConfigError>,
) -> Vec<Entry<T>> {
    let toml::Value::Array(items) = value else {
        errors.push(ConfigError::new(
            path,
            format!("expected an array of tables ([[{path}]])"),
        ));
        return Vec::new();
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let name = item
                .get("name")
                .and_then(toml::Value::as_str)
                .map(str::to_owned);
            match section(&format!("{path}[{i}]"), item, errors) {
                Some(parsed) => Entry::Valid(parsed),
                None => Entry::Invalid { name },
            }
        })
        .collect()
}

/// The message of a deserialization error, without the position toml adds (paths replace it).
fn describe(error: &toml::de::Error) -> String {
    error.message().trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(text: &str) -> Vec<String> {
        match parse(text) {
            Ok((_, errors)) => errors.iter().map(ToString::to_string).collect(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn reports_unknown_keys_in_every_section_with_their_paths() {
        let errors = messages(
            r#"
            colour = "blue"
            [server]
            admin_listen = "127.0.0.1:9090"
            lissen = "127.0.0.1:8080"
            [[routes]]
            name = "a"
            path_prefix = "/a"
            upstrem = "x"
            [[routes]]
            name = "b"
            path_prefix = "/b"
            "#,
        );
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("colour: unknown key")));
        assert!(
            errors.contains(&"server.lissen: unknown key".to_owned()),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"routes[0].upstrem: unknown key".to_owned()),
            "{errors:?}"
        );
    }

    #[test]
    fn reports_wrong_types_at_the_nested_field() {
        let errors = messages(
            r#"
            [server]
            admin_listen = "127.0.0.1:9090"
            [[upstreams]]
            name = "a"
            targets = ["127.0.0.1:1"]
            connect_timeout = "soon"
            [upstreams.health_check]
            interval = 5
            "#,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("upstreams[0].connect_timeout: invalid duration \"soon\""),
            "{errors:?}"
        );
    }

    #[test]
    fn reports_every_unknown_key_of_a_table_and_keeps_reading_it() {
        let (config, errors) = parse(
            r#"
            [server]
            admin_listen = "127.0.0.1:9090"
            lissen = "127.0.0.1:8080"
            colour = "blue"
            [[server.tls]]
            listen = "127.0.0.1:8443"
            cert = "c"
            key = "k"
            keyy = "k"
            [[upstreams]]
            name = "u"
            targets = ["127.0.0.1:1"]
            [upstreams.health_check]
            paht = "/x"
            "#,
        )
        .unwrap();
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            vec![
                "server.colour: unknown key",
                "server.lissen: unknown key",
                "server.tls[0].keyy: unknown key",
                "upstreams[0].health_check.paht: unknown key",
            ]
        );
        let server = config.server.expect("the rest of [server] still read");
        assert_eq!(server.admin_listen, "127.0.0.1:9090");
    }

    #[test]
    fn reports_syntax_errors_with_a_line() {
        let errors = messages("[server]\nadmin_listen = \n");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("not valid TOML (line 2)"),
            "{errors:?}"
        );
    }

    #[test]
    fn requires_the_server_table() {
        assert_eq!(messages(""), vec!["server: missing table [server]"]);
    }
}
