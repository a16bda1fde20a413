//! `control-plane serve | migrate`: settings come from the environment (see the README).

use std::process::ExitCode;

use tollgate_control_plane::api::{AppState, app};
use tollgate_control_plane::settings::{Settings, redact_url};
use tollgate_control_plane::store::Store;

fn main() -> ExitCode {
    let command = std::env::args().nth(1).unwrap_or_default();
    if !matches!(command.as_str(), "serve" | "migrate") {
        eprintln!(
            "usage: control-plane serve | migrate\n(settings: DATABASE_URL, CONTROL_PLANE_LISTEN, TOLLGATE_ADMIN_TOKEN, \
             TOLLGATE_USAGE_RETENTION_DAYS)"
        );
        return ExitCode::from(2);
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(errors) => {
            for error in errors {
                eprintln!("control-plane: {error}");
            }
            return ExitCode::FAILURE;
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only for a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .try_init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("control-plane: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("control-plane: {}", tollgate_control_plane::causes(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(command: &str, settings: Settings) -> anyhow::Result<()> {
    use anyhow::Context;
    let store = Store::connect(&settings.database_url)
        .await
        .with_context(|| {
            format!(
                "DATABASE_URL: cannot connect to {}",
                redact_url(&settings.database_url)
            )
        })?;
    store
        .migrate()
        .await
        .context("cannot apply the migrations")?;
    if command == "migrate" {
        println!("migrations applied");
        return Ok(());
    }
    if let Some(token) =
        tollgate_control_plane::ensure_first_admin(&store, settings.admin_token.as_deref()).await?
    {
        println!(
            "first admin token (shown once, store it now): {}",
            token.expose()
        );
    }
    let _pruning =
        tollgate_control_plane::spawn_usage_pruning(store.clone(), settings.usage_retention);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("CONTROL_PLANE_LISTEN: cannot listen on {}", settings.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "control plane listening");
    axum::serve(listener, app(AppState::new(store)))
        .with_graceful_shutdown(async {
            tollgate_control_plane::stop_signal().await;
            tracing::info!("stopping: requests in flight finish first");
        })
        .await?;
    tracing::info!("control plane stopped");
    Ok(())
}
