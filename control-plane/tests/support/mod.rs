//! What every API test file shares: a migrated store on SQLite or on the real Postgres
//! (`postgres://postgres@127.0.0.1:5432`, a fresh database per test) with an admin and a viewer
//! token, `call`, which sends a request through the real router and checks the answer against
//! the OpenAPI document, the shape of answers with generated values replaced, and
//! `on_both_backends!`, which runs each scenario on both stores.

#![allow(dead_code)]

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use serde_json::{Value, json};
use tollgate_control_plane::api::{AppState, app};
use tollgate_control_plane::secret::{PlainToken, Role, hash};
use tollgate_control_plane::store::Store;
use tower::ServiceExt;

use super::contract;

pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

/// A migrated store on one backend, with an admin and a viewer token.
pub struct Db {
    pub store: Store,
    pub url: String,
    pub admin: String,
    pub viewer: String,
    postgres_database: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    pub async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("tollgate.db").display()
        );
        Self::open(url, None, Some(dir)).await
    }

    pub async fn postgres() -> Db {
        sqlx::any::install_default_drivers();
        let name = format!("tollgate_test_{}", &PlainToken::generate().expose()[4..20]);
        let admin = sqlx::AnyPool::connect(&format!("{POSTGRES}/postgres"))
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        Self::open(format!("{POSTGRES}/{name}"), Some(name), None).await
    }

    async fn open(
        url: String,
        postgres_database: Option<String>,
        dir: Option<tempfile::TempDir>,
    ) -> Db {
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let admin = PlainToken::generate().expose().to_owned();
        let viewer = PlainToken::generate().expose().to_owned();
        store
            .create_admin_token("test admin", Role::Admin, &hash(&admin))
            .await
            .unwrap();
        store
            .create_admin_token("test viewer", Role::Viewer, &hash(&viewer))
            .await
            .unwrap();
        Db {
            store,
            url,
            admin,
            viewer,
            postgres_database,
            _dir: dir,
        }
    }

    pub fn app(&self) -> Router {
        app(AppState::new(self.store.clone()))
    }

    pub async fn drop_database(self) {
        if let Some(name) = self.postgres_database {
            drop(self.store);
            let admin = sqlx::AnyPool::connect(&format!("{POSTGRES}/postgres"))
                .await
                .unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&admin)
                .await
                .unwrap();
        }
    }

    /// A new token with role `gateway`.
    pub async fn gateway_token(&self) -> String {
        let token = PlainToken::generate().expose().to_owned();
        self.store
            .create_admin_token("test gateway", Role::Gateway, &hash(&token))
            .await
            .unwrap();
        token
    }

    /// A raw connection to the same database, for what the API does not expose yet.
    pub async fn sql(&self) -> sqlx::AnyPool {
        sqlx::AnyPool::connect(&self.url).await.unwrap()
    }
}

/// Sends a request; returns the status, the JSON body (`Value::Null` when empty) and headers.
pub async fn call(
    app: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value, HeaderMap) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("x-request-id", "test-request");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
        None => request.body(Body::empty()).unwrap(),
    };
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let content_type = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    contract::check(
        method,
        path,
        status.as_u16(),
        content_type.as_deref(),
        &value,
    );
    (status, value, headers)
}

pub fn pro_plan() -> Value {
    json!({
        "name": "pro",
        "rate_limits": [{"requests": 20, "window_seconds": 60}, {"requests": 5, "window_seconds": 1}],
        "quota": {"requests": 10000, "hard": true},
        "price": {"currency": "usd", "unit_amount_micros": 1000}
    })
}

/// A plan and a customer on it, through the API; returns both bodies.
pub async fn customer_on_a_plan(app: &Router, db: &Db) -> (Value, Value) {
    let (_, plan, _) = call(app, "POST", "/v1/plans", Some(&db.admin), Some(pro_plan())).await;
    let body = json!({"name": "Acme", "email": "a@acme.example", "plan_id": plan["id"]});
    let (status, customer, _) =
        call(app, "POST", "/v1/customers", Some(&db.admin), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{customer}");
    (plan, customer)
}

/// The answer with every generated value replaced by a placeholder naming its kind, so whole
/// bodies can be compared exactly: ids (`<plan_id>`), times (`<time>`), keys, tokens, hashes.
pub fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(name, member)| (name.clone(), shape(member)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        Value::String(text) => json!(placeholder(text).unwrap_or_else(|| text.clone())),
        other => other.clone(),
    }
}

pub fn placeholder(text: &str) -> Option<String> {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    for prefix in ["plan", "cus", "key", "adm", "evt"] {
        if let Some(rest) = text.strip_prefix(prefix).and_then(|r| r.strip_prefix('_'))
            && hex(rest, 32)
        {
            return Some(format!("<{prefix}_id>"));
        }
    }
    if tollgate_model::key::is_well_formed(text) {
        return Some("<key>".into());
    }
    if text.starts_with("tg_") && text.len() == tollgate_model::key::DISPLAY_LEN {
        return Some("<key start>".into());
    }
    if text.strip_prefix("tga_").is_some_and(|rest| hex(rest, 64)) {
        return Some("<token>".into());
    }
    if humantime::parse_rfc3339(text).is_ok() {
        return Some("<time>".into());
    }
    None
}

pub fn problem(slug: &str, title: &str, status: u16, detail: &str) -> Value {
    json!({"type": format!("urn:tollgate:problem:{slug}"), "title": title, "status": status, "detail": detail})
}

macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let db = super::Db::sqlite().await;
                    super::$scenario(&db).await;
                    db.drop_database().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let db = super::Db::postgres().await;
                    super::$scenario(&db).await;
                    db.drop_database().await;
                }
            )*
        }
    };
}
