//! `[[upstreams]]`: targets resolved once, timeouts, health checks.

use std::net::{SocketAddr, ToSocketAddrs};

use super::super::file::{HealthCheckConfig, UpstreamConfig};
use super::super::headers::header_value;
use super::super::{HealthCheck, PassiveHealth, Target, Timeouts, Upstream};
use super::{Errors, check_name};

/// Checks one upstream.
pub(super) fn upstream(file: &UpstreamConfig, path: &str, errors: &mut Errors) -> Option<Upstream> {
    let before = errors.0.len();
    check_name(&file.name, &format!("{path}.name"), errors);
    if file.targets.is_empty() {
        errors.push(format!("{path}.targets"), "must list at least one target");
    }
    let mut targets: Vec<Target> = Vec::new();
    for (i, text) in file.targets.iter().enumerate() {
        let target_path = format!("{path}.targets[{i}]");
        if let Some(target) = target(text, &target_path, errors) {
            if targets.iter().any(|t| t.address == target.address) {
                errors.push(
                    target_path,
                    format!(
                        "{text:?} resolves to {} like an earlier target",
                        target.address
                    ),
                );
            } else {
                targets.push(target);
            }
        }
    }
    let host_header = file
        .host_header
        .as_deref()
        .and_then(|host| header_value(host, &format!("{path}.host_header"), errors));
    for (field, value) in [
        ("connect_timeout", file.connect_timeout),
        ("read_timeout", file.read_timeout),
        ("write_timeout", file.write_timeout),
        ("idle_timeout", file.idle_timeout),
        ("websocket_idle_timeout", file.websocket_idle_timeout),
    ] {
        if value.is_zero() {
            errors.push(format!("{path}.{field}"), "must be longer than zero");
        }
    }
    if file.request_timeout.is_some_and(|t| t.is_zero()) {
        errors.push(
            format!("{path}.request_timeout"),
            "must be longer than zero",
        );
    }
    if file.passive.fail_timeout.is_zero() && file.passive.max_fails > 0 {
        errors.push(
            format!("{path}.passive.fail_timeout"),
            "must be longer than zero",
        );
    }
    let health_check = file
        .health_check
        .as_ref()
        .and_then(|check| health_check(check, &format!("{path}.health_check"), errors));
    (errors.0.len() == before).then(|| Upstream {
        name: file.name.clone(),
        targets,
        tls: file.tls,
        sni: file.sni.clone(),
        host_header,
        timeouts: Timeouts {
            connect: file.connect_timeout,
            read: file.read_timeout,
            write: file.write_timeout,
            request: file.request_timeout,
            idle: file.idle_timeout,
            websocket_idle: file.websocket_idle_timeout,
        },
        connect_retries: file.connect_retries,
        health_check,
        passive: PassiveHealth {
            max_fails: file.passive.max_fails,
            fail_timeout: file.passive.fail_timeout,
        },
    })
}

/// Parses `host:port` (IPv6 in brackets) and resolves the host once, now, preferring IPv4.
fn target(text: &str, path: &str, errors: &mut Errors) -> Option<Target> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(Target {
            name: text.to_owned(),
            address,
            host: address.ip().to_string(),
        });
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        errors.push(
            path,
            format!("invalid target {text:?}: expected \"host:port\""),
        );
        return None;
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        errors.push(
            path,
            format!("invalid target {text:?}: expected \"host:port\""),
        );
        return None;
    }
    // Services on "localhost" mostly listen on 127.0.0.1 while the name often resolves to ::1
    // first: take the first IPv4 address, else the first one.
    let resolved = text.to_socket_addrs().map(|found| {
        let all: Vec<SocketAddr> = found.collect();
        all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
    });
    match resolved {
        Ok(Some(address)) => Some(Target {
            name: text.to_owned(),
            address,
            host: host.trim_matches(['[', ']']).to_owned(),
        }),
        Ok(None) | Err(_) => {
            errors.push(path, format!("cannot resolve {host:?}"));
            None
        }
    }
}

fn health_check(file: &HealthCheckConfig, path: &str, errors: &mut Errors) -> Option<HealthCheck> {
    let before = errors.0.len();
    if !file.path.starts_with('/') || file.path.contains(char::is_whitespace) {
        errors.push(
            format!("{path}.path"),
            "must start with / and contain no spaces",
        );
    }
    if file.interval.is_zero() {
        errors.push(format!("{path}.interval"), "must be longer than zero");
    }
    if file.timeout.is_zero() {
        errors.push(format!("{path}.timeout"), "must be longer than zero");
    }
    if file.healthy_threshold == 0 {
        errors.push(format!("{path}.healthy_threshold"), "must be at least 1");
    }
    if file.unhealthy_threshold == 0 {
        errors.push(format!("{path}.unhealthy_threshold"), "must be at least 1");
    }
    (errors.0.len() == before).then(|| HealthCheck {
        path: file.path.clone(),
        interval: file.interval,
        timeout: file.timeout,
        healthy_threshold: file.healthy_threshold,
        unhealthy_threshold: file.unhealthy_threshold,
        host: file.host.clone(),
    })
}
