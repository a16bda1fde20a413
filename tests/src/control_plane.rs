//! A control plane under test: the real `control-plane serve` process on SQLite or a fresh
//! Postgres database, and a small client for its admin API (also served by a standalone
//! gateway's admin listener).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::gateway::{PATIENCE, build_binary};

/// The Postgres server of this machine.
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

/// An admin token for tests (64 hex digits).
pub fn admin_token() -> String {
    format!(
        "tga_{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build_binary("tollgate-control-plane", "control-plane"))
}

/// A new, empty Postgres database; dropped with the value.
pub struct PostgresDatabase {
    /// Its name.
    pub name: String,
}

impl PostgresDatabase {
    /// Creates one.
    pub async fn create() -> PostgresDatabase {
        let name = format!("tollgate_e2e_{:016x}", rand::random::<u64>());
        run_sql(&format!("CREATE DATABASE {name}")).await;
        PostgresDatabase { name }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("{POSTGRES}/{}", self.name)
    }
}

async fn run_sql(statement: &str) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("{POSTGRES}/postgres"))
        .await
        .expect("connect to the local Postgres");
    sqlx::query(statement).execute(&pool).await.unwrap();
    pool.close().await;
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Dropping runs outside any runtime the test may be shutting down.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(run_sql(&statement));
            }
        })
        .join();
    }
}

/// A `control-plane serve` process; killed when dropped.
pub struct ControlPlane {
    child: Child,
    /// Its address.
    pub address: SocketAddr,
    /// The first admin's token.
    pub admin_token: String,
}

impl ControlPlane {
    /// Starts one on `database_url` and waits until it answers.
    pub async fn start(database_url: &str) -> ControlPlane {
        let address = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        Self::start_at(database_url, address, &admin_token()).await
    }

    /// Starts one on `database_url` at `address` (again, after [`kill`](Self::kill)) whose first
    /// admin is `admin_token`, and waits until it answers.
    pub async fn start_at(
        database_url: &str,
        address: SocketAddr,
        admin_token: &str,
    ) -> ControlPlane {
        let admin_token = admin_token.to_owned();
        let child = Command::new(binary())
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("CONTROL_PLANE_LISTEN", address.to_string())
            .env("TOLLGATE_ADMIN_TOKEN", &admin_token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the control plane");
        let control_plane = ControlPlane {
            child,
            address,
            admin_token,
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let url = format!("http://{address}/health/ready");
            if let Ok(response) = client.get(&url).send().await
                && response.status() == 200
            {
                return control_plane;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the control plane did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its admin API, as the first admin.
    pub fn api(&self) -> AdminApi {
        AdminApi::new(&format!("http://{}", self.address), &self.admin_token)
    }

    /// Sends it SIGTERM and waits, at most `within`, for it to exit; its exit status.
    pub async fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "the control plane still runs {within:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops it at once (SIGKILL).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of the admin API.
#[derive(Clone)]
pub struct AdminApi {
    base: String,
    token: String,
    client: reqwest::Client,
}

impl AdminApi {
    /// The API at `base` (`http://host:port`) with `token`.
    pub fn new(base: &str, token: &str) -> AdminApi {
        AdminApi {
            base: base.to_owned(),
            token: token.to_owned(),
            client: reqwest::Client::new(),
        }
    }

    /// Sends a request; returns the status and the JSON body (`Null` when empty).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// `POST`, expecting `201`; returns the body.
    pub async fn create(&self, path: &str, body: Value) -> Value {
        let (status, value) = self.call("POST", path, Some(body)).await;
        assert_eq!(status, 201, "POST {path}: {value}");
        value
    }

    /// A new token for gateways (role `gateway`), as gateways are given it.
    pub async fn gateway_token(&self) -> String {
        self.create(
            "/v1/admin-tokens",
            serde_json::json!({"name": "gw", "role": "gateway"}),
        )
        .await["token"]
            .as_str()
            .expect("a token")
            .to_owned()
    }

    /// A plan made of `plan` (a unique name added), a customer on it and a key of that customer:
    /// the customer's id and the key.
    pub async fn customer_on_plan(&self, plan: Value) -> (String, String) {
        let mut body = plan;
        body["name"] = serde_json::json!(format!("plan-{}", rand::random::<u32>()));
        let plan = self.create("/v1/plans", body).await;
        let email = format!("{}@example.test", rand::random::<u32>());
        let customer = self
            .create(
                "/v1/customers",
                serde_json::json!({"name": "acme", "email": email, "plan_id": plan["id"]}),
            )
            .await;
        let id = customer["id"].as_str().unwrap().to_owned();
        let key = self
            .create(
                &format!("/v1/customers/{id}/keys"),
                serde_json::json!({"name": "main"}),
            )
            .await["key"]
            .as_str()
            .unwrap()
            .to_owned();
        (id, key)
    }

    /// A plan, a customer on it and a key of that customer: (plan, customer, key).
    pub async fn customer_with_key(&self, name: &str) -> (Value, Value, Value) {
        let plan = self
            .create(
                "/v1/plans",
                serde_json::json!({"name": format!("{name}-plan")}),
            )
            .await;
        let customer = self
            .create(
                "/v1/customers",
                serde_json::json!({
                    "name": name,
                    "email": format!("{name}@example.test"),
                    "plan_id": plan["id"],
                }),
            )
            .await;
        let key = self
            .create(
                &format!("/v1/customers/{}/keys", customer["id"].as_str().unwrap()),
                serde_json::json!({"name": "main"}),
            )
            .await;
        (plan, customer, key)
    }
}
