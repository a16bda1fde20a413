//! The OpenAPI document: served at `/openapi.json`, generated from the router, with request
//! schemas that name exactly the fields the handlers accept; and the contract check that the API
//! tests run on every answer fails when an answer strays from it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod contract;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tollgate_control_plane::api::{self, AppState, app};
use tollgate_control_plane::store::Store;
use tower::ServiceExt;

async fn served_document() -> (StatusCode, Option<String>, Value) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let response = app(AppState::new(store))
        .oneshot(
            Request::builder()
                .uri("/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .unwrap();
    (
        status,
        content_type,
        serde_json::from_slice(&bytes).unwrap(),
    )
}

fn document() -> Value {
    serde_json::to_value(api::openapi_document()).unwrap()
}

#[tokio::test]
async fn the_document_is_served_without_a_token() {
    let (status, content_type, served) = served_document().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert_eq!(served, document());
    assert_eq!(served["openapi"], "3.1.0");
    assert_eq!(served["info"]["title"], "Tollgate control plane");
}

#[test]
fn every_operation_of_the_api_is_documented_once_with_a_unique_id() {
    let doc = document();
    let mut operations = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            operations.insert(format!("{} {path}", method.to_uppercase()));
            let id = operation["operationId"].as_str().unwrap().to_owned();
            assert!(ids.insert(id.clone()), "operationId {id} is used twice");
        }
    }
    let expected: BTreeSet<String> = [
        "GET /health",
        "GET /health/ready",
        "GET /v1/plans",
        "POST /v1/plans",
        "GET /v1/plans/{id}",
        "PATCH /v1/plans/{id}",
        "DELETE /v1/plans/{id}",
        "GET /v1/customers",
        "POST /v1/customers",
        "GET /v1/customers/{id}",
        "PATCH /v1/customers/{id}",
        "GET /v1/customers/{id}/keys",
        "POST /v1/customers/{id}/keys",
        "GET /v1/keys/{id}",
        "POST /v1/keys/{id}/revoke",
        "POST /v1/keys/{id}/rotate",
        "GET /v1/admin-tokens",
        "POST /v1/admin-tokens",
        "DELETE /v1/admin-tokens/{id}",
        "GET /v1/audit-log",
        "GET /v1/gateway/snapshot",
        "GET /v1/gateway/changes",
        "POST /v1/gateway/usage",
        "GET /v1/gateway/usage/period",
        "GET /v1/customers/{id}/usage",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(operations, expected);
    assert_eq!(operations.len(), 25);
}

#[test]
fn every_v1_operation_requires_a_token_and_every_post_but_usage_batches_takes_an_idempotency_key() {
    let doc = document();
    assert_eq!(
        doc["components"]["securitySchemes"]["admin_token"],
        json!({"type": "http", "scheme": "bearer", "description": "An admin, viewer or gateway token (tga_ and 64 hex digits)"})
    );
    assert_eq!(doc["security"], json!([{"admin_token": []}]));
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let public = operation["security"] == json!([{}]);
            assert_eq!(public, path.starts_with("/health"), "{method} {path}");
            if path.starts_with("/v1") {
                assert!(
                    operation["responses"]["401"].is_object(),
                    "{method} {path} documents no 401"
                );
            }
            let takes_key = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header");
            // Usage batches are idempotent by their event ids instead.
            let remembered = !api::idempotency::NOT_REMEMBERED.contains(&path.as_str());
            assert_eq!(takes_key, method == "post" && remembered, "{method} {path}");
        }
    }
}

fn request_fields(doc: &Value, path: &str, method: &str) -> BTreeSet<String> {
    let reference =
        doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap();
    let name = reference.trim_start_matches("#/components/schemas/");
    doc["components"]["schemas"][name]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn set(fields: &[&str]) -> BTreeSet<String> {
    fields.iter().map(|f| (*f).to_owned()).collect()
}

#[test]
fn request_schemas_name_exactly_the_fields_the_handlers_accept() {
    use tollgate_control_plane::api::{admin_tokens, customers, keys, plans, usage};
    let doc = document();
    assert_eq!(
        request_fields(&doc, "/v1/plans", "post"),
        set(&plans::PLAN_FIELDS)
    );
    assert_eq!(
        request_fields(&doc, "/v1/plans/{id}", "patch"),
        set(&plans::PLAN_FIELDS)
    );
    assert_eq!(
        request_fields(&doc, "/v1/customers", "post"),
        set(&customers::FIELDS[..3])
    );
    assert_eq!(
        request_fields(&doc, "/v1/customers/{id}", "patch"),
        set(&customers::FIELDS)
    );
    assert_eq!(
        request_fields(&doc, "/v1/customers/{id}/keys", "post"),
        set(&keys::NEW_KEY_FIELDS)
    );
    assert_eq!(
        request_fields(&doc, "/v1/keys/{id}/rotate", "post"),
        set(&keys::ROTATE_FIELDS)
    );
    assert_eq!(
        request_fields(&doc, "/v1/admin-tokens", "post"),
        set(&admin_tokens::FIELDS)
    );
    assert_eq!(
        request_fields(&doc, "/v1/gateway/usage", "post"),
        set(&["events"])
    );
    assert_eq!(
        doc["components"]["schemas"]["UsageBatchBody"]["properties"]["events"]["items"]["$ref"],
        "#/components/schemas/UsageEventBody"
    );
    let event: BTreeSet<String> = doc["components"]["schemas"]["UsageEventBody"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(event, set(&usage::batch::EVENT_FIELDS));
    // The documented event is the model's, field for field.
    let model = serde_json::to_value(tollgate_model::usage::UsageEvent {
        id: String::new(),
        request_id: String::new(),
        customer_id: String::new(),
        key_id: None,
        route: String::new(),
        method: String::new(),
        status: 200,
        latency_us: 0,
        bytes_in: 0,
        bytes_out: 0,
        at_ms: 0,
        units: 0,
        overage: 0,
    })
    .unwrap();
    let model: BTreeSet<String> = model.as_object().unwrap().keys().cloned().collect();
    assert_eq!(event, model);
}

#[test]
fn the_contract_check_accepts_a_documented_answer() {
    let plan = json!({
        "id": "plan_1", "name": "pro", "rate_limits": [{"requests": 1, "window_seconds": 1}],
        "quota": null, "price": {"currency": "usd", "unit_amount_micros": 5},
        "status": "active", "created_at": "t", "updated_at": "t"
    });
    contract::check(
        "GET",
        "/v1/plans/plan_1",
        200,
        Some("application/json"),
        &plan,
    );
}

#[test]
#[should_panic(expected = "$.colour is not documented")]
fn the_contract_check_refuses_an_undocumented_member() {
    let plan = json!({
        "id": "plan_1", "name": "pro", "rate_limits": [], "status": "active",
        "created_at": "t", "updated_at": "t", "colour": "red"
    });
    contract::check(
        "GET",
        "/v1/plans/plan_1",
        200,
        Some("application/json"),
        &plan,
    );
}

#[test]
#[should_panic(expected = "$.status is required but missing")]
fn the_contract_check_refuses_a_missing_member() {
    let plan = json!({"id": "plan_1", "name": "pro", "rate_limits": [], "created_at": "t", "updated_at": "t"});
    contract::check(
        "GET",
        "/v1/plans/plan_1",
        200,
        Some("application/json"),
        &plan,
    );
}

#[test]
#[should_panic(expected = "$.data[0].status")]
fn the_contract_check_refuses_a_value_outside_an_enumeration() {
    let page = json!({"data": [{
        "id": "plan_1", "name": "pro", "rate_limits": [], "status": "paused",
        "created_at": "t", "updated_at": "t"
    }], "next_cursor": null});
    contract::check("GET", "/v1/plans", 200, Some("application/json"), &page);
}

#[test]
#[should_panic(expected = "status 418 is not documented")]
fn the_contract_check_refuses_an_undocumented_status() {
    contract::check(
        "GET",
        "/v1/plans",
        418,
        Some("application/problem+json"),
        &json!({}),
    );
}

#[test]
#[should_panic(expected = "content type \"application/json\" is not documented")]
fn the_contract_check_refuses_a_problem_with_the_wrong_content_type() {
    contract::check(
        "GET",
        "/v1/plans",
        401,
        Some("application/json"),
        &json!({"type": "urn:tollgate:problem:unauthenticated", "title": "t", "status": 401}),
    );
}
