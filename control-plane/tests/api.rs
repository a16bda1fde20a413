//! The admin API through the real router, on SQLite and on the real Postgres
//! (`postgres://postgres@127.0.0.1:5432`, a fresh database per test). Every scenario runs on both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod contract;
#[macro_use]
mod support;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use serde_json::{Value, json};
use sqlx::Row;
use support::{Db, call, customer_on_a_plan, pro_plan, problem, shape};
use tollgate_control_plane::api::body;
use tollgate_control_plane::secret::{PlainToken, Role, hash};
use tower::ServiceExt;

async fn creates_reads_and_lists_plans(db: &Db) {
    let app = db.app();
    let (status, created, headers) =
        call(&app, "POST", "/v1/plans", Some(&db.admin), Some(pro_plan())).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("plan_") && id.len() == 5 + 32, "{id}");
    assert_eq!(headers["location"], format!("/v1/plans/{id}"));
    let mut shape = created.clone();
    for volatile in ["id", "created_at", "updated_at"] {
        assert!(shape[volatile].is_string());
        shape[volatile] = json!("…");
    }
    assert_eq!(
        shape,
        json!({
            "id": "…",
            "name": "pro",
            "rate_limits": [{"requests": 20, "window_seconds": 60}, {"requests": 5, "window_seconds": 1}],
            "quota": {"requests": 10000, "hard": true},
            "price": {"currency": "usd", "unit_amount_micros": 1000},
            "upgrade_url": null,
            "status": "active",
            "created_at": "…",
            "updated_at": "…",
        })
    );
    let (status, read, _) = call(
        &app,
        "GET",
        &format!("/v1/plans/{id}"),
        Some(&db.viewer),
        None,
    )
    .await;
    assert_eq!((status, &read), (StatusCode::OK, &created));

    for i in 0..4 {
        let body = json!({"name": format!("p{i}")});
        let (status, _, _) = call(&app, "POST", "/v1/plans", Some(&db.admin), Some(body)).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/plans?limit=2&cursor={c}"),
            None => "/v1/plans?limit=2".to_owned(),
        };
        let (status, page, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
        assert_eq!(status, StatusCode::OK);
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        seen.extend(data.iter().map(|p| p["name"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec!["pro", "p0", "p1", "p2", "p3"],
        "every plan once, in creation order"
    );
    let (status, _, _) = call(&app, "GET", "/v1/plans?limit=0", Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn an_invalid_plan_lists_every_invalid_field(db: &Db) {
    let (status, problem, headers) = call(
        &db.app(),
        "POST",
        "/v1/plans",
        Some(&db.admin),
        Some(json!({
            "name": "has spaces",
            "rate_limits": [{"requests": 0, "window_seconds": 60}, {"requests": 5}],
            "quota": {"requests": -1, "hard": "yes"},
            "price": {"currency": "dollars", "unit_amount_micros": 1},
            "colour": "blue"
        })),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem["type"], "urn:tollgate:problem:validation");
    let mut paths: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        vec![
            "colour",
            "name",
            "price.currency",
            "quota.hard",
            "quota.requests",
            "rate_limits[0].requests",
            "rate_limits[1].window_seconds",
        ]
    );
    let (status, _, _) = call(
        &db.app(),
        "POST",
        "/v1/plans",
        Some(&db.admin),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "name is required");
}

async fn duplicate_names_conflict_and_unknown_ids_are_not_found(db: &Db) {
    let app = db.app();
    call(&app, "POST", "/v1/plans", Some(&db.admin), Some(pro_plan())).await;
    let (status, problem, _) =
        call(&app, "POST", "/v1/plans", Some(&db.admin), Some(pro_plan())).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["type"], "urn:tollgate:problem:conflict");
    assert_eq!(problem["detail"], "a plan named \"pro\" exists");
    let (status, problem, _) =
        call(&app, "GET", "/v1/plans/plan_nope", Some(&db.admin), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem["detail"], "no such plan");
}

async fn roles_are_enforced(db: &Db) {
    let app = db.app();
    let (status, problem, _) = call(&app, "GET", "/v1/plans", None, None).await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            StatusCode::UNAUTHORIZED,
            Some("urn:tollgate:problem:unauthenticated")
        )
    );
    let (status, _, _) = call(&app, "GET", "/v1/plans", Some("tga_not_a_real_token"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, problem, _) = call(
        &app,
        "POST",
        "/v1/plans",
        Some(&db.viewer),
        Some(pro_plan()),
    )
    .await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            StatusCode::FORBIDDEN,
            Some("urn:tollgate:problem:forbidden")
        )
    );
    let (status, _, _) = call(&app, "GET", "/v1/plans", Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::OK);
    // The scheme's name in any case, as HTTP has it.
    for scheme in ["bearer", "BEARER"] {
        let response = app
            .clone()
            .oneshot(
                Request::get("/v1/plans")
                    .header("authorization", format!("{scheme} {}", db.viewer))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{scheme}");
    }
}

async fn plans_are_patched_and_deleted_or_archived_with_an_audit_entry_each(db: &Db) {
    let app = db.app();
    let (_, plan, _) = call(&app, "POST", "/v1/plans", Some(&db.admin), Some(pro_plan())).await;
    let id = plan["id"].as_str().unwrap().to_owned();
    let patch = json!({"quota": null, "name": "pro-2"});
    let (status, patched, _) = call(
        &app,
        "PATCH",
        &format!("/v1/plans/{id}"),
        Some(&db.admin),
        Some(patch),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["name"], "pro-2");
    assert_eq!(patched["quota"], Value::Null);
    assert_eq!(
        patched["rate_limits"], plan["rate_limits"],
        "untouched fields stay"
    );

    // In use by a customer: archived, not deleted.
    let sql = db.sql().await;
    sqlx::query(
        "INSERT INTO customers (id, name, email, plan_id, status, created_at, updated_at) \
         VALUES ('cus_1', 'A', 'a@example.com', $1, 'active', 0, 0)",
    )
    .bind(&id)
    .execute(&sql)
    .await
    .unwrap();
    let (status, archived, _) = call(
        &app,
        "DELETE",
        &format!("/v1/plans/{id}"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(
        (status, archived["status"].as_str()),
        (StatusCode::OK, Some("archived"))
    );

    let (_, unused, _) = call(
        &app,
        "POST",
        "/v1/plans",
        Some(&db.admin),
        Some(json!({"name": "free"})),
    )
    .await;
    let unused = unused["id"].as_str().unwrap().to_owned();
    let (status, body, _) = call(
        &app,
        "DELETE",
        &format!("/v1/plans/{unused}"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, _, _) = call(
        &app,
        "GET",
        &format!("/v1/plans/{unused}"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Every mutation left an audit entry and bumped the config version.
    let rows = sqlx::query(
        "SELECT actor, action, target_id, before_json, after_json, request_id FROM audit_log ORDER BY seq",
    )
    .fetch_all(&sql)
    .await
    .unwrap();
    let actions: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String, _>("action").unwrap())
        .collect();
    assert_eq!(
        actions,
        vec![
            "plan.create",
            "plan.update",
            "plan.archive",
            "plan.create",
            "plan.delete"
        ]
    );
    for row in &rows {
        assert!(
            row.try_get::<String, _>("actor")
                .unwrap()
                .starts_with("adm_")
        );
        assert_eq!(
            row.try_get::<Option<String>, _>("request_id")
                .unwrap()
                .as_deref(),
            Some("test-request")
        );
    }
    let update = &rows[1];
    let before: Value =
        serde_json::from_str(&update.try_get::<String, _>("before_json").unwrap()).unwrap();
    let after: Value =
        serde_json::from_str(&update.try_get::<String, _>("after_json").unwrap()).unwrap();
    assert_eq!(
        (before["name"].as_str(), after["name"].as_str()),
        (Some("pro"), Some("pro-2"))
    );
    let versions: Vec<i64> = sqlx::query("SELECT version FROM change_log ORDER BY version")
        .fetch_all(&sql)
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("version").unwrap())
        .collect();
    assert_eq!(versions.len(), 5);
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    sql.close().await;
}

async fn customers_are_created_listed_and_changed(db: &Db) {
    let app = db.app();
    let (_, pro, _) = call(&app, "POST", "/v1/plans", Some(&db.admin), Some(pro_plan())).await;
    let (_, free, _) = call(
        &app,
        "POST",
        "/v1/plans",
        Some(&db.admin),
        Some(json!({"name": "free"})),
    )
    .await;
    let (pro, free) = (pro["id"].as_str().unwrap(), free["id"].as_str().unwrap());

    let body = json!({"name": "Acme Corp", "email": "Ops@Acme.example", "plan_id": pro});
    let (status, created, headers) =
        call(&app, "POST", "/v1/customers", Some(&db.admin), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cus_"));
    assert_eq!(headers["location"], format!("/v1/customers/{id}"));
    assert_eq!(
        (
            created["name"].as_str(),
            created["email"].as_str(),
            created["plan_id"].as_str(),
            created["status"].as_str()
        ),
        (
            Some("Acme Corp"),
            Some("ops@acme.example"),
            Some(pro),
            Some("active")
        )
    );

    // A plan change and a suspension.
    let patch = json!({"plan_id": free, "status": "suspended"});
    let (status, changed, _) = call(
        &app,
        "PATCH",
        &format!("/v1/customers/{id}"),
        Some(&db.admin),
        Some(patch),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(
        (changed["plan_id"].as_str(), changed["status"].as_str()),
        (Some(free), Some("suspended"))
    );
    let (_, read, _) = call(
        &app,
        "GET",
        &format!("/v1/customers/{id}"),
        Some(&db.viewer),
        None,
    )
    .await;
    assert_eq!(read, changed);

    // Errors: duplicate email, unknown plan, bad fields, unknown id, viewer writes.
    let dup = json!({"name": "Other", "email": "ops@acme.example", "plan_id": pro});
    let (status, problem, _) =
        call(&app, "POST", "/v1/customers", Some(&db.admin), Some(dup)).await;
    assert_eq!(
        (status, problem["type"].as_str()),
        (StatusCode::CONFLICT, Some("urn:tollgate:problem:conflict"))
    );
    let ghost = json!({"name": "Ghost", "email": "g@example.com", "plan_id": "plan_0000"});
    let (status, problem, _) =
        call(&app, "POST", "/v1/customers", Some(&db.admin), Some(ghost)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        problem["errors"],
        json!([{"path": "plan_id", "message": "no active plan has this id"}])
    );
    let bad = json!({"name": "", "email": "not-an-email", "plan": pro});
    let (status, problem, _) =
        call(&app, "POST", "/v1/customers", Some(&db.admin), Some(bad)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let mut paths: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    paths.sort_unstable();
    assert_eq!(paths, vec!["email", "name", "plan", "plan_id"]);
    let (status, _, _) = call(
        &app,
        "PATCH",
        "/v1/customers/cus_nope",
        Some(&db.admin),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(
        &app,
        "PATCH",
        &format!("/v1/customers/{id}"),
        Some(&db.viewer),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // An archived plan takes no new customers.
    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("/v1/plans/{free}"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "in use: archived");
    let late = json!({"name": "Late", "email": "late@example.com", "plan_id": free});
    let (status, _, _) = call(&app, "POST", "/v1/customers", Some(&db.admin), Some(late)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (status, page, _) = call(&app, "GET", "/v1/customers", Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_cursor"], Value::Null);
}

async fn admin_tokens_are_shown_once_and_audited(db: &Db) {
    let app = db.app();
    let body = json!({"name": "grafana", "role": "viewer"});
    let (status, created, _) = call(
        &app,
        "POST",
        "/v1/admin-tokens",
        Some(&db.admin),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with("tga_") && id.starts_with("adm_"));
    assert_eq!(
        (created["name"].as_str(), created["role"].as_str()),
        (Some("grafana"), Some("viewer"))
    );

    // The new token reads but cannot write.
    let (status, _, _) = call(&app, "GET", "/v1/plans", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&app, "POST", "/v1/plans", Some(&token), Some(pro_plan())).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, list, _) = call(&app, "GET", "/v1/admin-tokens", Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::OK);
    let listed = list["data"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    for entry in listed {
        let keys: Vec<&String> = entry.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            vec!["created_at", "id", "name", "role"],
            "no token, no hash"
        );
    }
    let (status, problem, _) = call(
        &app,
        "POST",
        "/v1/admin-tokens",
        Some(&db.admin),
        Some(json!({"role": "root"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2, "{problem}");

    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("/v1/admin-tokens/{id}"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = call(&app, "GET", "/v1/plans", Some(&token), None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a deleted token no longer works"
    );
    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("/v1/admin-tokens/{id}"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The only admin token cannot be deleted.
    let admin_id = listed
        .iter()
        .find(|t| t["role"] == "admin")
        .and_then(|t| t["id"].as_str())
        .unwrap()
        .to_owned();
    let (status, problem, _) = call(
        &app,
        "DELETE",
        &format!("/v1/admin-tokens/{admin_id}"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");

    // The audit log has both changes, newest first, and no secret.
    let (status, log, _) = call(&app, "GET", "/v1/audit-log?limit=1", Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log["data"][0]["action"], "admin_token.delete");
    assert_eq!(log["data"][0]["target_id"], id.as_str());
    assert_eq!(log["data"][0]["request_id"], "test-request");
    let cursor = log["next_cursor"].as_str().unwrap().to_owned();
    let (_, older, _) = call(
        &app,
        "GET",
        &format!("/v1/audit-log?cursor={cursor}"),
        Some(&db.viewer),
        None,
    )
    .await;
    assert_eq!(older["data"][0]["action"], "admin_token.create");
    assert_eq!(older["data"][0]["after"]["role"], "viewer");
    let everything = format!("{log}{older}{list}");
    assert!(!everything.contains(&token) && !everything.contains(&hash(&token)));
    let (status, _, _) = call(
        &app,
        "GET",
        "/v1/audit-log?cursor=nope",
        Some(&db.viewer),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn keys_are_shown_once_stored_hashed_revoked_and_rotated(db: &Db) {
    let app = db.app();
    let (_, customer) = customer_on_a_plan(&app, db).await;
    let customer = customer["id"].as_str().unwrap().to_owned();
    let keys_path = format!("/v1/customers/{customer}/keys");

    let body =
        json!({"name": "ci", "expires_at": "2099-01-01T00:00:00Z", "scopes": ["orders", "users"]});
    let (status, created, _) = call(&app, "POST", &keys_path, Some(&db.admin), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(tollgate_model::key::is_well_formed(&key), "{key}");
    assert_eq!(created["display_start"], key[..9]);
    assert_eq!(created["scopes"], json!(["orders", "users"]));
    assert_eq!(created["expires_at"], "2099-01-01T00:00:00.000Z");
    assert_eq!(created["revoked_at"], Value::Null);
    let id = created["id"].as_str().unwrap().to_owned();

    // Stored as a SHA-256 only; listed without key or hash.
    let sql = db.sql().await;
    let stored: String = sqlx::query("SELECT hash FROM api_keys WHERE id = $1")
        .bind(&id)
        .fetch_one(&sql)
        .await
        .unwrap()
        .try_get("hash")
        .unwrap();
    assert_eq!(stored, hash(&key));
    let (status, list, _) = call(&app, "GET", &keys_path, Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::OK);
    let listed = &list["data"][0];
    assert!(listed.get("key").is_none() && listed.get("hash").is_none());
    assert!(!list.to_string().contains(&key) && !list.to_string().contains(&stored));

    // Rotation: a new key, the old one works until the grace ends. Gateways are told of both.
    let before_rotation = db.store.latest_version().await.unwrap();
    let (status, rotated, _) = call(
        &app,
        "POST",
        &format!("/v1/keys/{id}/rotate"),
        Some(&db.admin),
        Some(json!({"grace_seconds": 3600})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{rotated}");
    let new_key = rotated["key"].as_str().unwrap();
    assert_ne!(new_key, key);
    assert_eq!(rotated["scopes"], json!(["orders", "users"]));
    assert_eq!(rotated["replaces"]["id"], id.as_str());
    assert!(rotated["replaces"]["works_until"].as_str().unwrap() > "2026");
    let published = db.store.changes_since(before_rotation, 10).await.unwrap();
    let keys: Vec<(String, Option<i64>)> = published
        .changes
        .iter()
        .map(|change| match &change.entity {
            tollgate_model::feed::ChangedEntity::Key { id, key } => {
                (id.clone(), key.as_ref().and_then(|k| k.revoked_at_ms))
            }
            other => panic!("only keys change: {other:?}"),
        })
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0].0, id, "the old key first, with its grace end");
    assert!(keys[0].1.is_some());
    assert_eq!(
        (keys[1].0.as_str(), keys[1].1),
        (rotated["id"].as_str().unwrap(), None)
    );
    // Rotated already, in its grace: it has its successor, and is not given a second one.
    let (status, problem, _) = call(
        &app,
        "POST",
        &format!("/v1/keys/{id}/rotate"),
        Some(&db.admin),
        Some(json!({"grace_seconds": 600})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("rotated already")
            && detail.contains(rotated["replaces"]["works_until"].as_str().unwrap()),
        "{problem}"
    );

    // Revocation: now. It takes no body: a field (a reason, say) would be dropped.
    let new_id = rotated["id"].as_str().unwrap();
    let (status, problem, _) = call(
        &app,
        "POST",
        &format!("/v1/keys/{new_id}/revoke"),
        Some(&db.admin),
        Some(json!({"reason": "leaked"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(
        problem["errors"],
        json!([{"path": "reason", "message": "unknown field"}])
    );
    let (status, read, _) = call(
        &app,
        "GET",
        &format!("/v1/keys/{new_id}"),
        Some(&db.viewer),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(
        read["revoked_at"],
        Value::Null,
        "not revoked by the refused call"
    );
    assert_eq!(read["id"], rotated["id"]);
    assert!(
        read.get("key").is_none() && read.get("hash").is_none(),
        "{read}"
    );
    let (status, revoked, _) = call(
        &app,
        "POST",
        &format!("/v1/keys/{new_id}/revoke"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(revoked["revoked_at"].is_string());
    let (_, read, _) = call(
        &app,
        "GET",
        &format!("/v1/keys/{new_id}"),
        Some(&db.viewer),
        None,
    )
    .await;
    assert_eq!(read, revoked, "read as revoked");
    // A revoked key is not rotated into a working one (409), nor an expired one.
    let (status, problem, _) = call(
        &app,
        "POST",
        &format!("/v1/keys/{new_id}/rotate"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("revoked"),
        "{problem}"
    );
    let (status, expiring, _) = call(
        &app,
        "POST",
        &keys_path,
        Some(&db.admin),
        Some(json!({"name": "soon"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{expiring}");
    let expiring = expiring["id"].as_str().unwrap();
    sqlx::query("UPDATE api_keys SET expires_at = 1 WHERE id = $1")
        .bind(expiring)
        .execute(&sql)
        .await
        .unwrap();
    let (status, problem, _) = call(
        &app,
        "POST",
        &format!("/v1/keys/{expiring}/rotate"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("expired"),
        "{problem}"
    );

    // Errors.
    let bad = json!({"name": "x y", "expires_at": "2001-01-01T00:00:00Z", "scopes": []});
    let (status, problem, _) = call(&app, "POST", &keys_path, Some(&db.admin), Some(bad)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let mut paths: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    paths.sort_unstable();
    assert_eq!(paths, vec!["expires_at", "name", "scopes"]);
    let (status, _, _) = call(
        &app,
        "POST",
        "/v1/customers/cus_nope/keys",
        Some(&db.admin),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(
        &app,
        "POST",
        "/v1/keys/key_nope/revoke",
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, problem, _) = call(&app, "GET", "/v1/keys/key_nope", Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let (status, _, _) = call(
        &app,
        "POST",
        &keys_path,
        Some(&db.viewer),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The audit log never holds a key or its hash.
    let (_, log, _) = call(
        &app,
        "GET",
        "/v1/audit-log?limit=100",
        Some(&db.admin),
        None,
    )
    .await;
    let log = log.to_string();
    assert!(log.contains("key.rotate") && log.contains("key.revoke") && log.contains("key.create"));
    assert!(!log.contains(&key) && !log.contains(new_key) && !log.contains(&stored));
    sql.close().await;
}

async fn idempotent_retries_replay_the_first_answer(db: &Db) {
    let app = db.app();
    let send = |key: &'static str, body: Value| {
        let request = Request::builder()
            .method("POST")
            .uri("/v1/plans")
            .header("authorization", format!("Bearer {}", db.admin))
            .header("idempotency-key", key)
            .body(Body::from(body.to_string()))
            .unwrap();
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (
                status,
                headers,
                serde_json::from_slice::<Value>(&bytes).unwrap(),
            )
        }
    };
    let (status, headers, first) = send("retry-1", pro_plan()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, again) = send("retry-1", pro_plan()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(
        headers["location"],
        format!("/v1/plans/{}", first["id"].as_str().unwrap())
    );
    assert_eq!(again, first, "the same plan, not a second one");
    let (_, page, _) = call(&app, "GET", "/v1/plans", Some(&db.admin), None).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    let (_, log, _) = call(&app, "GET", "/v1/audit-log", Some(&db.admin), None).await;
    assert_eq!(
        log["data"].as_array().unwrap().len(),
        1,
        "one change audited"
    );

    let (status, _, problem) = send("retry-1", json!({"name": "other"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["errors"][0]["path"], "Idempotency-Key");
    // A failed request is not remembered: fixing it under the same key works.
    let (status, _, _) = send("retry-2", json!({"name": "bad name"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _, _) = send("retry-2", json!({"name": "good"})).await;
    assert_eq!(status, StatusCode::CREATED);

    // A key's creation retried shows the same key again, though the store keeps no readable
    // copy of it: the remembered answer is sealed with the caller's token, which it does not
    // hold.
    let body = json!({"name": "Acme", "email": "a@acme.example", "plan_id": first["id"]});
    let (status, customer, _) =
        call(&app, "POST", "/v1/customers", Some(&db.admin), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{customer}");
    let keys_path = format!("/v1/customers/{}/keys", customer["id"].as_str().unwrap());
    let create_key = |authorization: String| {
        Request::builder()
            .method("POST")
            .uri(&keys_path)
            .header("authorization", authorization)
            .header("idempotency-key", "key-retry-1")
            .body(Body::from(json!({"name": "k"}).to_string()))
            .unwrap()
    };
    let read = async |response: axum::response::Response| {
        let replayed = response.headers().contains_key("idempotent-replayed");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (replayed, serde_json::from_slice::<Value>(&bytes).unwrap())
    };
    let (replayed, first) = read(
        app.clone()
            .oneshot(create_key(format!("Bearer {}", db.admin)))
            .await
            .unwrap(),
    )
    .await;
    assert!(!replayed);
    let key = first["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("tg_"), "{first}");
    let (replayed, again) = read(
        app.clone()
            .oneshot(create_key(format!("Bearer {}", db.admin)))
            .await
            .unwrap(),
    )
    .await;
    assert!(replayed);
    assert_eq!(again, first, "the same key, shown again");
    // The scheme's name in another case is the same caller.
    let lower = format!("bearer  {}", db.admin);
    let (replayed, again) = read(app.clone().oneshot(create_key(lower)).await.unwrap()).await;
    assert!(replayed);
    assert_eq!(again, first);
    // A token deleted since gets nothing replayed: it is refused.
    let (_, other, _) = call(
        &app,
        "POST",
        "/v1/admin-tokens",
        Some(&db.admin),
        Some(json!({"name": "temp", "role": "admin"})),
    )
    .await;
    let other_token = other["token"].as_str().unwrap().to_owned();
    let by_other = || create_key(format!("Bearer {other_token}"));
    let (replayed, _) = read(app.clone().oneshot(by_other()).await.unwrap()).await;
    assert!(!replayed);
    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("/v1/admin-tokens/{}", other["id"].as_str().unwrap()),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let response = app.clone().oneshot(by_other()).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(!response.headers().contains_key("idempotent-replayed"));
    // Remembered 24 hours: an answer older than that is not replayed.
    let sql = db.sql().await;
    sqlx::query("UPDATE idempotency_keys SET created_at = created_at - 86400001")
        .execute(&sql)
        .await
        .unwrap();
    let (replayed, later) = read(
        app.clone()
            .oneshot(create_key(format!("Bearer {}", db.admin)))
            .await
            .unwrap(),
    )
    .await;
    assert!(!replayed);
    assert_ne!(later["key"], first["key"], "a new key");
    let stored: Vec<String> = sqlx::query("SELECT response FROM idempotency_keys")
        .fetch_all(&sql)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get("response"))
        .collect();
    // The expired ones were deleted as the last one was remembered.
    assert_eq!(stored.len(), 1, "{stored:?}");
    let later_key = later["key"].as_str().unwrap();
    for response in &stored {
        assert!(response.contains("\"sealed\""), "{response}");
        assert!(
            !response.contains(later_key),
            "the key is stored: {response}"
        );
        assert!(!response.contains(later["id"].as_str().unwrap()));
    }
    // An answer an earlier version kept unsealed (one still running during an upgrade) is not
    // replayed: it is deleted, and the request made anew.
    let actor = hash(&format!("Bearer {}", db.admin));
    let plaintext = json!({"body": "{\"key\":\"tg_plaintext\"}"}).to_string();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    sqlx::query(
        "INSERT INTO idempotency_keys (actor, key, path, request_hash, status, response, created_at) \
         VALUES ($1, 'old-version', $2, 'any', 201, $3, $4)",
    )
    .bind(&actor)
    .bind(&keys_path)
    .bind(&plaintext)
    .bind(i64::try_from(now_ms).unwrap())
    .execute(&sql)
    .await
    .unwrap();
    let retried = Request::builder()
        .method("POST")
        .uri(&keys_path)
        .header("authorization", format!("Bearer {}", db.admin))
        .header("idempotency-key", "old-version")
        .body(Body::from(json!({"name": "k"}).to_string()))
        .unwrap();
    let (replayed, made) = read(app.clone().oneshot(retried).await.unwrap()).await;
    assert!(!replayed);
    assert!(made["key"].as_str().unwrap().starts_with("tg_"), "{made}");
    let left: String =
        sqlx::query("SELECT response FROM idempotency_keys WHERE key = 'old-version'")
            .fetch_one(&sql)
            .await
            .unwrap()
            .get("response");
    assert!(
        left.contains("\"sealed\"") && !left.contains("tg_plaintext"),
        "{left}"
    );
    sql.close().await;
}

/// `TOLLGATE_ADMIN_TOKEN` registers its token at each start, in place of the one an earlier value
/// set; a token deleted through the API stays deleted though the variable still names it (before,
/// the next start registered it again).
async fn the_environment_s_admin_token_is_replaced_by_a_new_value_and_stays_deleted(db: &Db) {
    let app = db.app();
    let can_read = async |token: &str| {
        let (status, _, _) = call(&app, "GET", "/v1/plans", Some(token), None).await;
        status == StatusCode::OK
    };
    let first = format!("first-{}", "a".repeat(40));
    let second = format!("second-{}", "b".repeat(40));
    let start = async |token: &str| {
        tollgate_control_plane::ensure_first_admin(&db.store, Some(token))
            .await
            .unwrap()
    };
    assert!(start(&first).await.is_none(), "nothing generated");
    assert!(can_read(&first).await);
    // Registered once, however many starts.
    assert!(start(&first).await.is_none());
    let bootstrap = async || {
        let (_, page, _) = call(&app, "GET", "/v1/admin-tokens", Some(&db.admin), None).await;
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["name"] == tollgate_control_plane::BOOTSTRAP_TOKEN_NAME)
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(bootstrap().await.len(), 1);

    start(&second).await;
    assert!(can_read(&second).await);
    assert!(
        !can_read(&first).await,
        "the earlier value's token is replaced"
    );
    let ids = bootstrap().await;
    assert_eq!(ids.len(), 1);

    let (status, _, _) = call(
        &app,
        "DELETE",
        &format!("/v1/admin-tokens/{}", ids[0]),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!can_read(&second).await);
    start(&second).await;
    assert!(!can_read(&second).await, "a deleted token stays deleted");
    assert!(bootstrap().await.is_empty());
    // A value replaced by a later one stays retired too (a rollback, a stale replica).
    start(&first).await;
    assert!(!can_read(&first).await, "a replaced value stays retired");
    // A new value is registered.
    let third = format!("third-{}", "c".repeat(40));
    start(&third).await;
    assert!(can_read(&third).await);
}

/// A token of role `gateway`, for the feed.
async fn gateway_token(db: &Db) -> String {
    let token = PlainToken::generate().expose().to_owned();
    db.store
        .create_admin_token("gw", Role::Gateway, &hash(&token))
        .await
        .unwrap();
    token
}

async fn gateways_get_a_snapshot_then_every_change_once_in_order(db: &Db) {
    let app = db.app();
    let gateway = gateway_token(db).await;
    let (plan, customer) = customer_on_a_plan(&app, db).await;
    let keys_path = format!("/v1/customers/{}/keys", customer["id"].as_str().unwrap());
    let (_, key, _) = call(
        &app,
        "POST",
        &keys_path,
        Some(&db.admin),
        Some(json!({"name": "k"})),
    )
    .await;

    // Only gateway tokens read the feed, and they read nothing else.
    for token in [&db.admin, &db.viewer] {
        let (status, _, _) = call(&app, "GET", "/v1/gateway/snapshot", Some(token), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let (status, _, _) = call(&app, "GET", "/v1/plans", Some(&gateway), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, snapshot, _) =
        call(&app, "GET", "/v1/gateway/snapshot", Some(&gateway), None).await;
    assert_eq!(status, StatusCode::OK);
    let version = snapshot["version"].as_i64().unwrap();
    assert!(version >= 3, "{snapshot}");
    assert_eq!(snapshot["plans"][0]["id"], plan["id"]);
    assert_eq!(
        snapshot["customers"][0],
        json!({"id": customer["id"], "plan_id": plan["id"], "status": "active", "billing_period": null})
    );
    assert_eq!(
        snapshot["keys"][0]["hash"],
        hash(key["key"].as_str().unwrap())
    );
    assert_eq!(snapshot["keys"][0]["revoked_at_ms"], Value::Null);

    let (status, nothing, _) = call(
        &app,
        "GET",
        &format!("/v1/gateway/changes?since={version}"),
        Some(&gateway),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(nothing, json!({"version": version, "changes": []}));
    let (status, _, _) = call(
        &app,
        "GET",
        &format!("/v1/gateway/changes?since={}", version + 100),
        Some(&gateway),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a version ahead of the store means: snapshot again"
    );
    // The snapshot marks its version with when that change was made; asked with that mark, the
    // store follows on, and with another (another store's history of that version) it refuses.
    let at = snapshot["version_at_ms"]
        .as_i64()
        .expect("the version's mark");
    for (mark, expected) in [(at, StatusCode::OK), (at + 1, StatusCode::CONFLICT)] {
        let (status, _, _) = call(
            &app,
            "GET",
            &format!("/v1/gateway/changes?since={version}&since_at_ms={mark}"),
            Some(&gateway),
            None,
        )
        .await;
        assert_eq!(status, expected, "since_at_ms={mark}");
    }

    // A gateway waits; changes made meanwhile reach it, in order, exactly once.
    let waiting = {
        let app = app.clone();
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let path = format!("/v1/gateway/changes?since={version}&wait_ms=10000");
            let started = std::time::Instant::now();
            let (status, changes, _) = call(&app, "GET", &path, Some(&gateway), None).await;
            (status, changes, started)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let changed_at = std::time::Instant::now();
    let key_id = key["id"].as_str().unwrap();
    let (status, _, _) = call(
        &app,
        "POST",
        &format!("/v1/keys/{key_id}/revoke"),
        Some(&db.admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let suspend = json!({"status": "suspended"});
    let customer_path = format!("/v1/customers/{}", customer["id"].as_str().unwrap());
    call(
        &app,
        "PATCH",
        &customer_path,
        Some(&db.admin),
        Some(suspend),
    )
    .await;
    let (status, first, _) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        changed_at.elapsed() < std::time::Duration::from_secs(1),
        "delivered within a second"
    );
    let mut seen: Vec<Value> = first["changes"].as_array().unwrap().clone();
    let mut at = first["version"].as_i64().unwrap();
    let mut mark = first["version_at_ms"].as_i64().expect("a page's mark");
    while seen.len() < 2 {
        let (_, more, _) = call(
            &app,
            "GET",
            &format!("/v1/gateway/changes?since={at}&wait_ms=2000"),
            Some(&gateway),
            None,
        )
        .await;
        seen.extend(more["changes"].as_array().unwrap().iter().cloned());
        at = more["version"].as_i64().unwrap();
        mark = more["version_at_ms"].as_i64().expect("a page's mark");
    }
    let versions: Vec<i64> = seen
        .iter()
        .map(|c| c["version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        vec![version + 1, version + 2],
        "in order, once each"
    );
    assert_eq!(seen[0]["kind"], "key");
    assert!(seen[0]["key"]["revoked_at_ms"].is_i64());
    assert_eq!(seen[1]["kind"], "customer");
    assert_eq!(seen[1]["customer"]["status"], "suspended");
    // A page's mark is its last change's: the changes after it follow on from there.
    let (status, after, _) = call(
        &app,
        "GET",
        &format!("/v1/gateway/changes?since={at}&since_at_ms={mark}"),
        Some(&gateway),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["changes"], json!([]));
}

async fn metrics_count_requests_by_route_pattern(db: &Db) {
    let app = db.app();
    let (_, plan, _) = call(&app, "POST", "/v1/plans", Some(&db.admin), Some(pro_plan())).await;
    let id = plan["id"].as_str().unwrap();
    call(
        &app,
        "GET",
        &format!("/v1/plans/{id}"),
        Some(&db.viewer),
        None,
    )
    .await;
    call(
        &app,
        "GET",
        "/v1/plans/plan_missing",
        Some(&db.viewer),
        None,
    )
    .await;
    let response = app
        .clone()
        .oneshot(
            Request::builder()
                .uri("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    for line in [
        r#"tollgate_control_plane_requests_total{method="POST",route="/v1/plans",status_class="2xx"} 1"#,
        r#"tollgate_control_plane_requests_total{method="GET",route="/v1/plans/{id}",status_class="2xx"} 1"#,
        r#"tollgate_control_plane_requests_total{method="GET",route="/v1/plans/{id}",status_class="4xx"} 1"#,
        "tollgate_control_plane_config_version 1",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(!text.contains(id), "no id in any label");
}

async fn readiness_reports_the_store(db: &Db) {
    let (status, body, _) = call(&db.app(), "GET", "/health/ready", None, None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"status": "ready", "store": "ok", "migrations": "current"})
        )
    );
}

/// The raw answer to a gateway's snapshot request: status, headers, body bytes.
async fn snapshot_bytes(
    app: &Router,
    token: &str,
    accept_encoding: Option<&str>,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut request = Request::builder()
        .uri("/v1/gateway/snapshot")
        .header("authorization", format!("Bearer {token}"));
    if let Some(coding) = accept_encoding {
        request = request.header("accept-encoding", coding);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 30)
        .await
        .unwrap();
    (status, headers, bytes.to_vec())
}

/// A store restored from a backup under a running control plane, whose history then reaches the
/// same version number again, is not served the snapshot file built for the old history: the
/// file is kept for a version and the time of its change.
async fn a_snapshot_is_rebuilt_when_the_store_is_restored_to_another_history_of_its_version(
    db: &Db,
) {
    let app = db.app();
    let gateway = gateway_token(db).await;
    let plan = |name: &str| {
        let app = app.clone();
        let admin = db.admin.clone();
        let body = json!({"name": name});
        async move {
            let (status, plan, _) = call(&app, "POST", "/v1/plans", Some(&admin), Some(body)).await;
            assert_eq!(status, StatusCode::CREATED, "{plan}");
        }
    };
    plan("first").await;
    plan("lost").await;
    let (status, old, _) = call(&app, "GET", "/v1/gateway/snapshot", Some(&gateway), None).await;
    assert_eq!(status, StatusCode::OK);
    let version = old["version"].as_i64().unwrap();

    // Restored to the version before, as a backup would be; then a different change is made.
    let sql = db.sql().await;
    sqlx::query("DELETE FROM plans WHERE name = 'lost'")
        .execute(&sql)
        .await
        .unwrap();
    sqlx::query("DELETE FROM change_log WHERE version = $1")
        .bind(version)
        .execute(&sql)
        .await
        .unwrap();
    let reset = if db.url.starts_with("sqlite") {
        "UPDATE sqlite_sequence SET seq = $1 WHERE name = 'change_log'"
    } else {
        "SELECT setval('change_log_version_seq', $1)"
    };
    sqlx::query(reset)
        .bind(version - 1)
        .execute(&sql)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    plan("instead").await;

    let (status, new, _) = call(&app, "GET", "/v1/gateway/snapshot", Some(&gateway), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(new["version"], version, "the same version number");
    assert_ne!(new["version_at_ms"], old["version_at_ms"], "{new}");
    let names: Vec<&str> = new["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"instead") && !names.contains(&"lost"),
        "{names:?}"
    );
}

async fn the_snapshot_streams_as_gzip_or_json_and_follows_each_change(db: &Db) {
    use std::io::Read;
    use tollgate_model::feed::Snapshot;

    let app = db.app();
    let gateway = gateway_token(db).await;
    let (_, customer) = customer_on_a_plan(&app, db).await;
    let customer_id = customer["id"].as_str().unwrap().to_owned();
    // Enough keys for the JSON to span many chunks.
    db.store
        .bulk_load_keys_for_benchmark(std::slice::from_ref(&customer_id), 3000)
        .await
        .unwrap();

    let (status, headers, gzip) = snapshot_bytes(&app, &gateway, Some("br;q=1, gzip;q=0.8")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["content-length"], gzip.len().to_string().as_str());
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(gzip.as_slice())
        .read_to_end(&mut json)
        .unwrap();
    assert!(
        json.len() > 8 * tollgate_control_plane::store::feed::CHUNK,
        "{} bytes",
        json.len()
    );
    assert!(gzip.len() < json.len());
    let snapshot: Snapshot = serde_json::from_slice(&json).unwrap();
    assert_eq!(snapshot.keys.len(), 3000);
    assert_eq!(snapshot.customers.len(), 1);
    assert_eq!(
        headers[tollgate_model::feed::SNAPSHOT_VERSION_HEADER],
        snapshot.version.to_string().as_str()
    );

    // Without gzip (or with it refused): the same JSON, uncompressed.
    for accept in [None, Some("gzip;q=0, identity")] {
        let (status, headers, plain) = snapshot_bytes(&app, &gateway, accept).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.get("content-encoding").is_none());
        assert_eq!(headers["content-length"], plain.len().to_string().as_str());
        assert_eq!(plain, json);
    }

    // A change moves the version; the next snapshot has it.
    let (status, key, _) = call(
        &app,
        "POST",
        &format!("/v1/customers/{customer_id}/keys"),
        Some(&db.admin),
        Some(json!({"name": "late"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, headers, plain) = snapshot_bytes(&app, &gateway, None).await;
    let after: Snapshot = serde_json::from_slice(&plain).unwrap();
    assert_eq!(after.version, snapshot.version + 1);
    assert_eq!(
        headers[tollgate_model::feed::SNAPSHOT_VERSION_HEADER],
        after.version.to_string().as_str()
    );
    assert_eq!(after.keys.len(), 3001);
    assert!(after.keys.iter().any(|k| k.id == key["id"]));
}

/// Every endpoint's answers, successes and errors, compared whole.
async fn every_answer_has_its_pinned_shape(db: &Db) {
    let app = db.app();
    let admin = Some(db.admin.as_str());
    let viewer = Some(db.viewer.as_str());
    let pinned = |answer: (StatusCode, Value, HeaderMap)| (answer.0.as_u16(), shape(&answer.1));

    // Plans.
    let created = call(&app, "POST", "/v1/plans", admin, Some(pro_plan())).await;
    let plan_id = created.1["id"].as_str().unwrap().to_owned();
    let plan = json!({
        "id": "<plan_id>", "name": "pro",
        "rate_limits": [{"requests": 20, "window_seconds": 60}, {"requests": 5, "window_seconds": 1}],
        "quota": {"requests": 10000, "hard": true},
        "price": {"currency": "usd", "unit_amount_micros": 1000}, "upgrade_url": null,
        "status": "active", "created_at": "<time>", "updated_at": "<time>"
    });
    assert_eq!(pinned(created), (201, plan.clone()));
    assert_eq!(
        pinned(call(&app, "GET", "/v1/plans?limit=1", viewer, None).await),
        (200, json!({"data": [plan.clone()], "next_cursor": null}))
    );
    assert_eq!(
        pinned(call(&app, "GET", &format!("/v1/plans/{plan_id}"), viewer, None).await),
        (200, plan.clone())
    );
    let mut renamed = plan.clone();
    renamed["name"] = json!("pro-2");
    assert_eq!(
        pinned(
            call(
                &app,
                "PATCH",
                &format!("/v1/plans/{plan_id}"),
                admin,
                Some(json!({"name": "pro-2"}))
            )
            .await
        ),
        (200, renamed)
    );
    let spare = call(
        &app,
        "POST",
        "/v1/plans",
        admin,
        Some(json!({"name": "spare"})),
    )
    .await;
    let spare_id = spare.1["id"].as_str().unwrap().to_owned();
    assert_eq!(
        pinned(spare),
        (
            201,
            json!({
                "id": "<plan_id>", "name": "spare", "rate_limits": [], "quota": null, "price": null,
                "upgrade_url": null, "status": "active", "created_at": "<time>", "updated_at": "<time>"
            })
        )
    );
    assert_eq!(
        pinned(
            call(
                &app,
                "DELETE",
                &format!("/v1/plans/{spare_id}"),
                admin,
                None
            )
            .await
        ),
        (204, Value::Null)
    );

    // Customers.
    let body = json!({"name": "Acme", "email": "Ops@Acme.example", "plan_id": plan_id});
    let created = call(&app, "POST", "/v1/customers", admin, Some(body)).await;
    let customer_id = created.1["id"].as_str().unwrap().to_owned();
    let customer = json!({
        "id": "<cus_id>", "name": "Acme", "email": "ops@acme.example", "plan_id": "<plan_id>",
        "status": "active", "billing_period": null, "created_at": "<time>", "updated_at": "<time>"
    });
    assert_eq!(pinned(created), (201, customer.clone()));
    assert_eq!(
        pinned(call(&app, "GET", "/v1/customers", viewer, None).await),
        (
            200,
            json!({"data": [customer.clone()], "next_cursor": null})
        )
    );
    assert_eq!(
        pinned(
            call(
                &app,
                "GET",
                &format!("/v1/customers/{customer_id}"),
                viewer,
                None
            )
            .await
        ),
        (200, customer.clone())
    );
    let mut suspended = customer.clone();
    suspended["status"] = json!("suspended");
    assert_eq!(
        pinned(
            call(
                &app,
                "PATCH",
                &format!("/v1/customers/{customer_id}"),
                admin,
                Some(json!({"status": "suspended"}))
            )
            .await
        ),
        (200, suspended)
    );

    // Keys.
    let keys = format!("/v1/customers/{customer_id}/keys");
    let body = json!({"name": "prod", "scopes": ["orders"], "expires_at": "2099-01-01T00:00:00Z"});
    let created = call(&app, "POST", &keys, admin, Some(body)).await;
    let key_id = created.1["id"].as_str().unwrap().to_owned();
    let key = json!({
        "id": "<key_id>", "customer_id": "<cus_id>", "name": "prod", "display_start": "<key start>",
        "scopes": ["orders"], "expires_at": "<time>", "revoked_at": null, "created_at": "<time>"
    });
    let mut issued = key.clone();
    issued["key"] = json!("<key>");
    assert_eq!(pinned(created), (201, issued.clone()));
    assert_eq!(
        pinned(call(&app, "GET", &keys, viewer, None).await),
        (200, json!({"data": [key.clone()], "next_cursor": null}))
    );
    let rotated = call(
        &app,
        "POST",
        &format!("/v1/keys/{key_id}/rotate"),
        admin,
        Some(json!({"grace_seconds": 60})),
    )
    .await;
    let new_key_id = rotated.1["id"].as_str().unwrap().to_owned();
    let mut replacement = issued.clone();
    replacement["replaces"] = json!({"id": "<key_id>", "works_until": "<time>"});
    assert_eq!(pinned(rotated), (201, replacement));
    let mut revoked = key.clone();
    revoked["revoked_at"] = json!("<time>");
    assert_eq!(
        pinned(
            call(
                &app,
                "POST",
                &format!("/v1/keys/{new_key_id}/revoke"),
                admin,
                None
            )
            .await
        ),
        (200, revoked)
    );

    // Usage.
    let gateway = db.gateway_token().await;
    let gateway = Some(gateway.as_str());
    let at = tollgate_control_plane::store::now_ms();
    let usage_event = json!({
        "id": format!("evt_{:032x}", 1), "request_id": "req-1", "customer_id": customer_id,
        "key_id": key_id, "route": "orders", "method": "GET", "status": 200, "latency_us": 1500,
        "bytes_in": 10, "bytes_out": 100, "at_ms": at, "units": 1, "overage": 0
    });
    let batch = json!({"events": [usage_event]});
    assert_eq!(
        pinned(call(&app, "POST", "/v1/gateway/usage", gateway, Some(batch)).await),
        (200, json!({"inserted": 1, "duplicates": 0}))
    );
    let period = format!(
        "/v1/gateway/usage/period?customer_id={customer_id}&start_ms={at}&end_ms={}",
        at + 1
    );
    assert_eq!(
        pinned(call(&app, "GET", &period, gateway, None).await),
        (
            200,
            json!({"start_ms": at, "end_ms": at + 1, "units": 1, "overage": 0})
        )
    );
    assert_eq!(
        pinned(
            call(
                &app,
                "GET",
                &format!("/v1/customers/{customer_id}/usage"),
                viewer,
                None
            )
            .await
        ),
        (
            200,
            json!({
                "period": {"start": "<time>", "end": "<time>"},
                "quota": 10000, "hard": true, "used": 1, "remaining": 9999, "overage": 0,
                "days": [{
                    "day": tollgate_control_plane::calendar::day_of(at), "route": "orders",
                    "requests": 1, "units": 1, "overage": 0, "errors": 0,
                    "bytes_in": 10, "bytes_out": 100
                }]
            })
        )
    );

    // Admin tokens.
    let created = call(
        &app,
        "POST",
        "/v1/admin-tokens",
        admin,
        Some(json!({"name": "ci", "role": "viewer"})),
    )
    .await;
    let token_id = created.1["id"].as_str().unwrap().to_owned();
    assert_eq!(
        pinned(created),
        (
            201,
            json!({"id": "<adm_id>", "name": "ci", "role": "viewer", "created_at": "<time>", "token": "<token>"})
        )
    );
    assert_eq!(
        pinned(call(&app, "GET", "/v1/admin-tokens?limit=1", viewer, None).await),
        (
            200,
            json!({
                "data": [{"id": "<adm_id>", "name": "test admin", "role": "admin", "created_at": "<time>"}],
                "next_cursor": "<adm_id>"
            })
        )
    );
    assert_eq!(
        pinned(
            call(
                &app,
                "DELETE",
                &format!("/v1/admin-tokens/{token_id}"),
                admin,
                None
            )
            .await
        ),
        (204, Value::Null)
    );

    // The audit log: the newest entry, the token's deletion.
    let (status, log, _) = call(&app, "GET", "/v1/audit-log?limit=1", viewer, None).await;
    let mut entry = shape(&log["data"][0]);
    assert!(log["data"][0]["seq"].is_i64(), "{log}");
    entry["seq"] = json!("<seq>");
    assert_eq!(
        (status.as_u16(), entry, log["next_cursor"].is_string()),
        (
            200,
            json!({
                "seq": "<seq>", "at": "<time>", "actor": "<adm_id>", "action": "admin_token.delete",
                "target_type": "admin_token", "target_id": "<adm_id>",
                "before": {"id": "<adm_id>", "name": "ci", "role": "viewer", "created_at": "<time>"},
                "after": null, "request_id": "test-request"
            }),
            true
        )
    );

    // Health.
    assert_eq!(
        pinned(call(&app, "GET", "/health", None, None).await),
        (200, json!({"status": "ok"}))
    );

    // Errors, one of each kind.
    assert_eq!(
        pinned(call(&app, "GET", "/v1/plans", None, None).await),
        (
            401,
            problem(
                "unauthenticated",
                "Authentication required",
                401,
                "no token, or one this control plane does not know: send a token it issued \
                 (TOLLGATE_ADMIN_TOKEN, or POST /v1/admin-tokens) as Authorization: Bearer <token>"
            )
        )
    );
    assert_eq!(
        pinned(
            call(
                &app,
                "POST",
                "/v1/plans",
                viewer,
                Some(json!({"name": "x"}))
            )
            .await
        ),
        (
            403,
            problem(
                "forbidden",
                "Forbidden",
                403,
                "this token's role may only read"
            )
        )
    );
    assert_eq!(
        pinned(
            call(
                &app,
                "POST",
                "/v1/gateway/usage",
                viewer,
                Some(json!({"events": []}))
            )
            .await
        ),
        (
            403,
            problem(
                "forbidden",
                "Forbidden",
                403,
                "/v1/gateway is for gateway tokens (role \"gateway\")"
            )
        )
    );
    assert_eq!(
        pinned(call(&app, "GET", "/v1/plans", gateway, None).await),
        (
            403,
            problem(
                "forbidden",
                "Forbidden",
                403,
                "gateway tokens may only use /v1/gateway"
            )
        )
    );
    assert_eq!(
        pinned(call(&app, "GET", "/v1/plans/plan_nope", viewer, None).await),
        (404, problem("not-found", "Not found", 404, "no such plan"))
    );
    assert_eq!(
        pinned(call(&app, "GET", "/v1/customers/cus_nope", viewer, None).await),
        (
            404,
            problem("not-found", "Not found", 404, "no such customer")
        )
    );
    assert_eq!(
        pinned(call(&app, "POST", "/v1/keys/key_nope/revoke", admin, None).await),
        (404, problem("not-found", "Not found", 404, "no such key"))
    );
    assert_eq!(
        pinned(call(&app, "DELETE", "/v1/admin-tokens/adm_nope", admin, None).await),
        (
            404,
            problem("not-found", "Not found", 404, "no such admin token")
        )
    );
    assert_eq!(
        pinned(
            call(
                &app,
                "POST",
                "/v1/plans",
                admin,
                Some(json!({"name": "pro-2"}))
            )
            .await
        ),
        (
            409,
            problem("conflict", "Conflict", 409, "a plan named \"pro-2\" exists")
        )
    );
    let mut invalid = problem("validation", "Invalid request", 422, "2 invalid field(s)");
    invalid["errors"] = json!([
        {"path": "rate_limits[0].requests", "message": "must be an integer from 1 to 4294967295"},
        {"path": "colour", "message": "unknown field"}
    ]);
    let body =
        json!({"name": "x", "rate_limits": [{"requests": 0, "window_seconds": 1}], "colour": 1});
    let (status, answer, _) = call(&app, "POST", "/v1/plans", admin, Some(body)).await;
    let mut answer = shape(&answer);
    answer["errors"]
        .as_array_mut()
        .unwrap()
        .sort_by_key(|e| e["path"].as_str().map(str::len));
    invalid["errors"]
        .as_array_mut()
        .unwrap()
        .sort_by_key(|e| e["path"].as_str().map(str::len));
    assert_eq!((status.as_u16(), answer), (422, invalid));
    assert_eq!(
        pinned(call(&app, "GET", "/v1/plans?limit=abc", viewer, None).await),
        (
            400,
            problem(
                "bad-request",
                "Bad request",
                400,
                "a query parameter does not parse: limit: invalid digit found in string"
            )
        )
    );
    let huge = json!({"name": "x".repeat(body::MAX_BODY)});
    assert_eq!(
        pinned(call(&app, "POST", "/v1/plans", admin, Some(huge)).await),
        (
            413,
            problem(
                "body-too-large",
                "Body too large",
                413,
                "the body is larger than 1048576 bytes"
            )
        )
    );
    let huge = json!({"events": [], "padding": "x".repeat(8 << 20)});
    assert_eq!(
        pinned(call(&app, "POST", "/v1/gateway/usage", gateway, Some(huge)).await),
        (
            413,
            problem(
                "body-too-large",
                "Body too large",
                413,
                "the body is larger than 8388608 bytes"
            )
        )
    );
    assert_eq!(
        pinned(call(&app, "GET", "/v1/nothing-here", viewer, None).await),
        (404, problem("not-found", "Not found", 404, "no such route"))
    );
    assert_eq!(
        pinned(call(&app, "PUT", "/v1/plans", admin, Some(json!({}))).await),
        (
            405,
            problem(
                "method-not-allowed",
                "Method not allowed",
                405,
                "this path does not take this method"
            )
        )
    );
}

async fn waiting_gateways_share_one_reader_and_learn_of_any_process_s_change(db: &Db) {
    use std::time::Duration;
    use tollgate_control_plane::api::feed::Versions;
    use tollgate_control_plane::api::{AppState, app};
    // Gateways wait on `waited`; the change is written through `writer`. Through the same
    // process, with a version read only once a minute, only the write's own signal can tell
    // them in time; through another process (another state on the same database), the reads
    // every 100 ms do.
    let slow = AppState {
        versions: Versions::polling_every(Duration::from_secs(60)),
        ..AppState::new(db.store.clone())
    };
    let polling = AppState::new(db.store.clone());
    let elsewhere = db.app();
    let gateway = db.gateway_token().await;
    let (_, customer) = customer_on_a_plan(&elsewhere, db).await;
    let customer_path = format!("/v1/customers/{}", customer["id"].as_str().unwrap());
    let slow_app = app(slow.clone());
    let cases = [
        (&slow, slow_app.clone(), slow_app, "suspended"),
        (&polling, app(polling.clone()), elsewhere, "active"),
    ];
    for (state, waited, writer, status) in cases {
        let (_, at, _) = call(
            &waited,
            "GET",
            "/v1/gateway/changes?since=0",
            Some(&gateway),
            None,
        )
        .await;
        let version = at["version"].as_i64().unwrap();
        // A wait that ends with nothing: the reader runs, then idles with no one waiting, and
        // the next waiter must wake it.
        let path = format!("/v1/gateway/changes?since={version}&wait_ms=50");
        let (_, nothing, _) = call(&waited, "GET", &path, Some(&gateway), None).await;
        assert_eq!(nothing["changes"], json!([]));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reads_before = state.versions.reads();
        let waiting: Vec<_> = (0..50)
            .map(|_| {
                let waited = waited.clone();
                let gateway = gateway.clone();
                tokio::spawn(async move {
                    let path = format!("/v1/gateway/changes?since={version}&wait_ms=10000");
                    call(&waited, "GET", &path, Some(&gateway), None).await.1
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let changed_at = std::time::Instant::now();
        let (answer, _, _) = call(
            &writer,
            "PATCH",
            &customer_path,
            Some(&db.admin),
            Some(json!({"status": status})),
        )
        .await;
        assert_eq!(answer, StatusCode::OK);
        for waiter in waiting {
            let changes = waiter.await.unwrap();
            assert_eq!(changes["version"], version + 1, "{changes}");
            assert_eq!(changes["changes"][0]["customer"]["status"], status);
        }
        assert!(
            changed_at.elapsed() < Duration::from_secs(1),
            "every waiting gateway learns of the change within a second"
        );
        // 50 gateways polling the store themselves every 100 ms would have read it about 250
        // times while they waited; one reader reads it about 5 times at most.
        let reads = state.versions.reads() - reads_before;
        assert!(reads <= 15, "the store's version was read {reads} times");
    }
}

/// A PATCH that changes nothing (no field, or every field as it is) writes nothing: the same
/// `updated_at`, no audit entry, and no change for gateways to load.
async fn a_patch_that_changes_nothing_writes_nothing(db: &Db) {
    let app = db.app();
    let gateway = gateway_token(db).await;
    let (plan, customer) = customer_on_a_plan(&app, db).await;
    let customer_path = format!("/v1/customers/{}", customer["id"].as_str().unwrap());
    let period = json!({"start": "2027-01-15T00:00:00.000Z", "end": "2027-02-15T00:00:00.000Z"});
    let (status, customer, _) = call(
        &app,
        "PATCH",
        &customer_path,
        Some(&db.admin),
        Some(json!({"billing_period": period})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{customer}");
    // What the audit log and the gateways' feed hold now.
    let written = || async {
        let (_, log, _) = call(
            &app,
            "GET",
            "/v1/audit-log?limit=100",
            Some(&db.admin),
            None,
        )
        .await;
        let (_, snapshot, _) =
            call(&app, "GET", "/v1/gateway/snapshot", Some(&gateway), None).await;
        (
            log["data"].as_array().unwrap().len(),
            snapshot["version"].as_i64().unwrap(),
        )
    };
    let (entries, version) = written().await;
    let plan_path = format!("/v1/plans/{}", plan["id"].as_str().unwrap());
    let same_plan =
        json!({"name": plan["name"], "rate_limits": plan["rate_limits"], "quota": plan["quota"]});
    let same_customer = json!({"name": customer["name"], "plan_id": customer["plan_id"], "status": "active", "billing_period": period});
    for (path, patch, before) in [
        (&plan_path, json!({}), &plan),
        (&plan_path, same_plan, &plan),
        (&customer_path, json!({}), &customer),
        (&customer_path, same_customer, &customer),
    ] {
        let (status, after, _) =
            call(&app, "PATCH", path, Some(&db.admin), Some(patch.clone())).await;
        assert_eq!(status, StatusCode::OK, "{after}");
        assert_eq!(&after, before, "{path} {patch}");
    }
    assert_eq!(written().await, (entries, version));
    // A real change still writes, once.
    let (status, after, _) = call(
        &app,
        "PATCH",
        &customer_path,
        Some(&db.admin),
        Some(json!({"billing_period": null})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    let (entries_after, version_after) = written().await;
    assert_eq!(entries_after, entries + 1);
    assert!(version_after > version);
}

on_both_backends!(
    every_answer_has_its_pinned_shape,
    a_patch_that_changes_nothing_writes_nothing,
    creates_reads_and_lists_plans,
    an_invalid_plan_lists_every_invalid_field,
    duplicate_names_conflict_and_unknown_ids_are_not_found,
    roles_are_enforced,
    plans_are_patched_and_deleted_or_archived_with_an_audit_entry_each,
    customers_are_created_listed_and_changed,
    admin_tokens_are_shown_once_and_audited,
    keys_are_shown_once_stored_hashed_revoked_and_rotated,
    idempotent_retries_replay_the_first_answer,
    the_environment_s_admin_token_is_replaced_by_a_new_value_and_stays_deleted,
    gateways_get_a_snapshot_then_every_change_once_in_order,
    the_snapshot_streams_as_gzip_or_json_and_follows_each_change,
    a_snapshot_is_rebuilt_when_the_store_is_restored_to_another_history_of_its_version,
    metrics_count_requests_by_route_pattern,
    readiness_reports_the_store,
    waiting_gateways_share_one_reader_and_learn_of_any_process_s_change,
);
