//! `[metering]` and `[control_plane]`: the usage spool, and where identities and the ledger
//! come from (embedded on SQLite, or a separate control plane).

use std::path::Path;

use super::super::file::{ControlPlaneConfig, MeteringConfig};
use super::super::{ControlPlane, FeedSource, Metering};
use super::Errors;

/// Default store of the embedded control plane, next to the config file.
const EMBEDDED_DATABASE: &str = "sqlite://tollgate.db?mode=rwc";

/// Largest batch the control plane takes.
const MAX_BATCH: usize = tollgate_control_plane::store::usage::MAX_BATCH;

pub(super) fn metering(
    file: &MeteringConfig,
    base: &Path,
    errors: &mut Errors,
) -> Option<Metering> {
    let before = errors.0.len();
    if file.spool_dir.is_empty() {
        errors.push("metering.spool_dir", "must name a directory");
    }
    if file.spool_max_bytes < 1 << 20 {
        errors.push(
            "metering.spool_max_bytes",
            "must be at least 1048576 (1 MiB)",
        );
    }
    if file.flush_interval < std::time::Duration::from_millis(100)
        || file.flush_interval > std::time::Duration::from_secs(60)
    {
        errors.push("metering.flush_interval", "must be between 100ms and 60s");
    }
    if let Some(size) = file.batch_size
        && !(1..=MAX_BATCH).contains(&size)
    {
        errors.push(
            "metering.batch_size",
            format!("must be between 1 and {MAX_BATCH}"),
        );
    }
    (errors.0.len() == before).then(|| Metering {
        refund_upstream_5xx: file.refund_upstream_5xx,
        spool_dir: base.join(&file.spool_dir),
        spool_max_bytes: file.spool_max_bytes,
        flush_interval: file.flush_interval,
        batch_size: file.batch_size,
    })
}

pub(super) fn control_plane(
    file: &ControlPlaneConfig,
    base: &Path,
    errors: &mut Errors,
) -> Option<ControlPlane> {
    let source = match (file.embedded, &file.url) {
        (true, None) => {
            let url = file.database_url.as_deref().unwrap_or(EMBEDDED_DATABASE);
            if let Some(rest) = url.strip_prefix("sqlite://") {
                let relative = !rest.starts_with('/') && !rest.starts_with(":memory:");
                Some(FeedSource::Embedded {
                    database_url: if relative {
                        format!("sqlite://{}", base.join(rest).display())
                    } else {
                        url.to_owned()
                    },
                })
            } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Some(FeedSource::Embedded {
                    database_url: url.to_owned(),
                })
            } else {
                errors.push(
                    "control_plane.database_url",
                    format!("{url:?} is neither sqlite://… nor postgres://…"),
                );
                None
            }
        }
        (false, Some(url)) => {
            if file.database_url.is_some() {
                errors.push(
                    "control_plane.database_url",
                    "only applies with embedded = true (a separate control plane has its own)",
                );
            }
            let valid = (url.starts_with("http://") || url.starts_with("https://"))
                && url
                    .parse::<http::Uri>()
                    .is_ok_and(|uri| uri.host().is_some() && uri.query().is_none());
            if !valid {
                errors.push(
                    "control_plane.url",
                    format!("invalid URL {url:?}: expected http://host:port"),
                );
            }
            if file.token_env.is_empty() {
                errors.push(
                    "control_plane.token_env",
                    "must name the environment variable holding the gateway token",
                );
            } else if super::check_variable_name(&file.token_env, "control_plane.token_env", errors)
                && std::env::var(&file.token_env).is_ok_and(|token| token.trim().is_empty())
            {
                // Checked here too, not only at start, so that `--validate` in the gateway's
                // environment tells. (Unset here, it may be set where the gateway runs.)
                errors.push(
                    "control_plane.token_env",
                    format!("{} is set but empty", file.token_env),
                );
            }
            valid.then(|| FeedSource::Remote {
                url: url.trim_end_matches('/').to_owned(),
                token_env: file.token_env.clone(),
            })
        }
        (true, Some(_)) => {
            errors.push(
                "control_plane",
                "set either embedded = true or url, not both",
            );
            None
        }
        (false, None) => {
            errors.push(
                "control_plane",
                "set embedded = true (run it in this process) or url (follow a separate one)",
            );
            None
        }
    };
    if file.snapshot_file.is_empty() {
        errors.push("control_plane.snapshot_file", "must not be empty");
        return None;
    }
    Some(ControlPlane {
        source: source?,
        snapshot_file: base.join(&file.snapshot_file),
    })
}
