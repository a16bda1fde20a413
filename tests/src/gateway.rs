//! A gateway process under test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a gateway gets to start or to apply a change before a test fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// The `[server]` and `[log]` tables every test config starts with, then `rest`.
pub fn config(rest: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
threads = 2
grace_period = "10s"

[log]
format = "json"
level = "info"

{rest}
"#
    )
}

/// An `[[upstreams]]` named `name` with one target, and a `[[routes]]` of the same name that sends
/// `path_prefix` to it. `upstream_extra` and `route_extra` are further lines of each table.
pub fn proxy_route(
    name: &str,
    target: &str,
    path_prefix: &str,
    upstream_extra: &str,
    route_extra: &str,
) -> String {
    format!(
        r#"
[[upstreams]]
name = "{name}"
targets = ["{target}"]
{upstream_extra}

[[routes]]
name = "{name}"
path_prefix = "{path_prefix}"
upstream = "{name}"
{route_extra}
"#
    )
}

/// The gateway binary, built once per test process so it is never stale.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_binary("tollgate-gateway", "gateway"))
}

/// Builds `bin` of `package` (debug, like the tests) and returns its path.
pub fn build_binary(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building {bin} failed");
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/<bin>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir.join(bin);
    assert!(binary.exists(), "no {bin} binary at {}", binary.display());
    binary
}

/// How a start attempt ended.
enum Started {
    /// The gateway listens; its `tollgate gateway listening` line.
    Listening(Child, Arc<Mutex<Vec<Value>>>, Value),
    /// Another process took a port; the gateway's log lines.
    LostPort(Vec<Value>),
}

/// A running gateway process; killed when dropped.
pub struct Gateway {
    child: Child,
    /// The first plain proxy listener.
    pub proxy: SocketAddr,
    /// The first TLS proxy listener, if any.
    pub tls: Option<SocketAddr>,
    /// Every plain proxy listener.
    pub listeners: Vec<SocketAddr>,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The config file the gateway watches.
    pub config_path: PathBuf,
    /// The directory of the config file.
    pub dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<Value>>>,
    exit: Option<ExitStatus>,
}

impl Gateway {
    /// Starts a gateway with this config text and waits until its admin listener answers.
    pub async fn start(config: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, config).await
    }

    /// Starts a gateway whose config lives in `dir` (which may hold certificates), and waits
    /// until it says it listens. A port picked for `:0` can be taken by another process before
    /// the gateway binds it; the gateway then exits with status 1 and is started again.
    pub async fn start_in(dir: tempfile::TempDir, config: &str) -> Gateway {
        Self::start_with_env(dir, config, &[]).await
    }

    /// [`Gateway::start_in`], with these environment variables set for the process.
    pub async fn start_with_env(
        dir: tempfile::TempDir,
        config: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::spawn(&config_path, env).await {
                Started::Listening(child, logs, line) => {
                    return Self::from_start_line(child, logs, &line, config_path, dir);
                }
                Started::LostPort(logs) if attempt < 3 => {
                    eprintln!("gateway lost a port to another process; starting again: {logs:?}");
                }
                Started::LostPort(logs) => {
                    panic!("gateway could not listen three times: {logs:#?}")
                }
            }
        }
    }

    async fn spawn(config_path: &Path, env: &[(&str, &str)]) -> Started {
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(config_path)
            .env_remove("RUST_LOG")
            .env_remove("TOLLGATE_ADMIN_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the gateway");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(value) => sink.lock().unwrap().push(value),
                    Err(_) => sink.lock().unwrap().push(Value::String(line)),
                }
            }
        });
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(Value::String(line));
            }
        });

        let started = Instant::now();
        loop {
            let line = logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l["message"] == "tollgate gateway listening")
                .cloned();
            if let Some(line) = line {
                return Started::Listening(child, logs, line);
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader threads catch the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let lines = logs.lock().unwrap().clone();
                let lost_port = lines.iter().any(|l| {
                    l["message"].as_str().is_some_and(|m| {
                        m.starts_with("cannot listen on")
                            && m.ends_with("another process holds the port")
                    })
                });
                assert!(
                    lost_port,
                    "gateway exited with {status} before listening: {lines:#?}"
                );
                return Started::LostPort(lines);
            }
            assert!(
                started.elapsed() < PATIENCE,
                "gateway did not start: {:#?}",
                logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn from_start_line(
        child: Child,
        logs: Arc<Mutex<Vec<Value>>>,
        line: &Value,
        config_path: PathBuf,
        dir: tempfile::TempDir,
    ) -> Gateway {
        let addresses = |field: &str| -> Vec<SocketAddr> {
            line[field]
                .as_str()
                .unwrap_or("")
                .split(',')
                .filter_map(|s| s.parse().ok())
                .collect()
        };
        let listeners = addresses("listen");
        Gateway {
            proxy: listeners
                .first()
                .copied()
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1))),
            tls: addresses("tls_listen").first().copied(),
            admin: addresses("admin_listen")[0],
            listeners,
            child,
            config_path,
            dir,
            logs,
            exit: None,
        }
    }

    /// `http://<proxy><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// `GET <path>` on the proxy with `key` as the bearer credential.
    pub async fn get_with_key(&self, path: &str, key: &str) -> reqwest::Response {
        crate::client()
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
    }

    /// `http://<admin><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Replaces the config file the way editors do: write a new file, rename it over the old one.
    pub fn write_config(&self, text: &str) {
        let temporary = self.dir.path().join(".gateway.toml.new");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, &self.config_path).unwrap();
    }

    /// The `/health/ready` document.
    pub async fn ready(&self) -> Value {
        reqwest::get(self.admin_url("/health/ready"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the gateway holds `count` keys (polling `/health/ready`, which counts no
    /// request against any plan).
    pub async fn wait_for_keys(&self, count: u64) {
        let started = Instant::now();
        while self.ready().await["identities"]["keys"].as_u64() != Some(count) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "keys never arrived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one metric series, given its full name with labels as rendered.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The value of a counter series, 0 while it has not been counted yet (not rendered).
    pub async fn counted(&self, series: &str) -> f64 {
        self.metric(series).await.unwrap_or(0.0)
    }

    /// Waits until a metric series has `value` (a request is counted until just after its
    /// response is sent, so gauges settle a moment after the client has its answer).
    pub async fn wait_for_metric(&self, series: &str, value: f64) {
        let started = Instant::now();
        loop {
            let now = self.metric(series).await;
            if now == Some(value) {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{series} is {now:?}, never {value}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the running config has `version`.
    pub async fn wait_for_version(&self, version: u64) {
        let started = Instant::now();
        loop {
            if self.ready().await["config"]["version"] == version {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "config version {version} never applied: {:#?}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal by name (`TERM`, `HUP`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let signal = match name {
            "TERM" => nix::sys::signal::Signal::SIGTERM,
            "HUP" => nix::sys::signal::Signal::SIGHUP,
            "INT" => nix::sys::signal::Signal::SIGINT,
            "KILL" => nix::sys::signal::Signal::SIGKILL,
            other => panic!("no such signal in the harness: {other}"),
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.exit = Some(status);
                return status;
            }
            assert!(
                started.elapsed() < within,
                "gateway still running after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every log line so far (JSON lines parsed, other lines as strings).
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a log line that satisfies `predicate`.
    pub async fn wait_for_log(&self, predicate: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            if let Some(line) = self.logs.lock().unwrap().iter().find(|l| predicate(l)) {
                return line.clone();
            }
            assert!(
                started.elapsed() < PATIENCE,
                "no such log line in {:#?}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Gateway {
    /// Kills the process at once (SIGKILL) and hands back its directory, to start another
    /// gateway on the same files.
    pub fn kill(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        self.exit = status;
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A test that failed shows what its gateway said, to tell its failure from the
        // gateway's (the last lines only: a gateway under load logs a lot).
        if std::thread::panicking() {
            let logs = self
                .logs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let start = logs.len().saturating_sub(LOG_LINES_SHOWN);
            eprintln!(
                "gateway (proxy {}, admin {}), its last {} log lines:",
                self.proxy,
                self.admin,
                logs.len() - start
            );
            for line in &logs[start..] {
                eprintln!("  {line}");
            }
        }
    }
}

/// Log lines of its gateway a failed test prints.
const LOG_LINES_SHOWN: usize = 60;
