//! What a quota needs besides its size, through the real router on SQLite and Postgres: a
//! plan's upgrade URL (given in the quota problem) and a customer's billing period (the period
//! the quota counts in). Each is set, cleared, refused with its field path, audited and
//! published to gateways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod contract;
#[macro_use]
mod support;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::{Db, call, customer_on_a_plan, pro_plan};

/// The `after` of the newest audit entry.
async fn last_audit(db: &Db) -> Value {
    let (_, log, _) = call(
        &db.app(),
        "GET",
        "/v1/audit-log?limit=1",
        Some(&db.viewer),
        None,
    )
    .await;
    log["data"][0].clone()
}

async fn upgrade_urls_are_set_cleared_refused_and_published(db: &Db) {
    let app = db.app();
    let admin = Some(db.admin.as_str());
    let gateway = db.gateway_token().await;
    let mut body = pro_plan();
    body["upgrade_url"] = json!("https://acme.example/upgrade?plan=pro#top");
    let (status, plan, _) = call(&app, "POST", "/v1/plans", admin, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    assert_eq!(
        plan["upgrade_url"],
        "https://acme.example/upgrade?plan=pro#top"
    );
    let path = format!("/v1/plans/{}", plan["id"].as_str().unwrap());
    let (_, read, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
    assert_eq!(read, plan);

    // Published whole, in the snapshot and in the change that follows a PATCH.
    let (_, snapshot, _) = call(&app, "GET", "/v1/gateway/snapshot", Some(&gateway), None).await;
    assert_eq!(snapshot["plans"][0], plan);
    let version = snapshot["version"].as_i64().unwrap();
    let patch = json!({"upgrade_url": "http://localhost:8080/billing"});
    let (status, changed, _) = call(&app, "PATCH", &path, admin, Some(patch)).await;
    assert_eq!(
        (status, &changed["upgrade_url"]),
        (StatusCode::OK, &json!("http://localhost:8080/billing"))
    );
    let (_, changes, _) = call(
        &app,
        "GET",
        &format!("/v1/gateway/changes?since={version}"),
        Some(&gateway),
        None,
    )
    .await;
    assert_eq!(changes["changes"][0]["plan"], changed);
    let entry = last_audit(db).await;
    assert_eq!(
        (
            entry["action"].as_str(),
            &entry["before"]["upgrade_url"],
            &entry["after"]["upgrade_url"]
        ),
        (
            Some("plan.update"),
            &json!("https://acme.example/upgrade?plan=pro#top"),
            &json!("http://localhost:8080/billing")
        )
    );

    // Other changes keep it; null clears it.
    let (_, renamed, _) = call(&app, "PATCH", &path, admin, Some(json!({"name": "pro-2"}))).await;
    assert_eq!(renamed["upgrade_url"], "http://localhost:8080/billing");
    let (_, cleared, _) = call(
        &app,
        "PATCH",
        &path,
        admin,
        Some(json!({"upgrade_url": null})),
    )
    .await;
    assert_eq!(cleared["upgrade_url"], Value::Null);
    let (_, read, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
    assert_eq!(read["upgrade_url"], Value::Null);

    // The longest accepted is 2048 characters.
    let longest = format!("https://acme.example/{}", "a".repeat(2048 - 21));
    assert_eq!(longest.len(), 2048);
    let (status, _, _) = call(
        &app,
        "PATCH",
        &path,
        admin,
        Some(json!({"upgrade_url": longest})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let message = "must be an absolute https:// or http:// URL of at most 2048 characters, \
                   without spaces, or null";
    for bad in [
        json!(format!("{longest}a")),
        json!("ftp://acme.example/upgrade"),
        json!("acme.example/upgrade"),
        json!("//acme.example/upgrade"),
        json!("https://"),
        json!("https:///upgrade"),
        json!("https://acme.example/up grade"),
        json!("https://acme.example/\nupgrade"),
        json!("HTTPS://acme.example"),
        json!(42),
        json!({"url": "https://acme.example"}),
    ] {
        for (method, target) in [("POST", "/v1/plans"), ("PATCH", path.as_str())] {
            let body = json!({"name": "other", "upgrade_url": bad});
            let (status, problem, _) = call(&app, method, target, admin, Some(body)).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
            assert_eq!(
                problem["errors"],
                json!([{"path": "upgrade_url", "message": message}]),
                "{bad}"
            );
        }
    }
}

async fn billing_periods_are_set_cleared_refused_and_published(db: &Db) {
    let app = db.app();
    let admin = Some(db.admin.as_str());
    let gateway = db.gateway_token().await;
    let (_, customer) = customer_on_a_plan(&app, db).await;
    assert_eq!(customer["billing_period"], Value::Null);
    let id = customer["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/customers/{id}");
    let version = db.store.latest_version().await.unwrap();

    let november = json!({"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"});
    let (status, changed, _) = call(
        &app,
        "PATCH",
        &path,
        admin,
        Some(json!({"billing_period": november})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    let stored = json!({"start": "2026-11-01T00:00:00.000Z", "end": "2026-12-01T00:00:00.000Z"});
    assert_eq!(changed["billing_period"], stored);
    let (_, read, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
    assert_eq!(read, changed);
    let (_, listed, _) = call(&app, "GET", "/v1/customers", Some(&db.viewer), None).await;
    assert_eq!(listed["data"][0], changed);
    let entry = last_audit(db).await;
    assert_eq!(
        (
            entry["action"].as_str(),
            &entry["before"]["billing_period"],
            &entry["after"]["billing_period"]
        ),
        (Some("customer.update"), &Value::Null, &stored)
    );

    // Gateways get it in Unix milliseconds, in the change and in the snapshot.
    let record = json!({
        "id": id, "plan_id": customer["plan_id"], "status": "active",
        "billing_period": {"start_ms": 1_793_491_200_000_i64, "end_ms": 1_796_083_200_000_i64}
    });
    let (_, changes, _) = call(
        &app,
        "GET",
        &format!("/v1/gateway/changes?since={version}"),
        Some(&gateway),
        None,
    )
    .await;
    assert_eq!(
        changes["changes"],
        json!([{"version": version + 1, "kind": "customer", "id": id, "customer": record}])
    );
    let (_, snapshot, _) = call(&app, "GET", "/v1/gateway/snapshot", Some(&gateway), None).await;
    assert_eq!(snapshot["customers"], json!([record]));

    // Other changes keep it; null clears it.
    let (_, renamed, _) = call(&app, "PATCH", &path, admin, Some(json!({"name": "Acme 2"}))).await;
    assert_eq!(renamed["billing_period"], stored);
    let (_, cleared, _) = call(
        &app,
        "PATCH",
        &path,
        admin,
        Some(json!({"billing_period": null})),
    )
    .await;
    assert_eq!(cleared["billing_period"], Value::Null);
    let (_, snapshot, _) = call(&app, "GET", "/v1/gateway/snapshot", Some(&gateway), None).await;
    assert_eq!(snapshot["customers"][0]["billing_period"], Value::Null);

    // A day is the shortest period.
    let day = json!({"start": "2027-12-02T00:00:00Z", "end": "2027-12-03T00:00:00Z"});
    let (status, answer, _) = call(
        &app,
        "PATCH",
        &path,
        admin,
        Some(json!({"billing_period": day})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // A year (366 days) is the longest period.
    let leap_year = json!({"start": "2027-12-02T00:00:00Z", "end": "2028-12-02T00:00:00Z"});
    let (status, _, _) = call(
        &app,
        "PATCH",
        &path,
        admin,
        Some(json!({"billing_period": leap_year})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // Any RFC 3339 offset: the same instants.
    let offset = json!({"start": "2027-12-02T05:30:00+05:30", "end": "2028-12-01T19:00:00-05:00"});
    let (status, with_offsets, _) = call(
        &app,
        "PATCH",
        &path,
        admin,
        Some(json!({"billing_period": offset})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{with_offsets}");
    assert_eq!(
        with_offsets["billing_period"],
        json!({"start": "2027-12-02T00:00:00.000Z", "end": "2028-12-02T00:00:00.000Z"})
    );

    let rfc3339 = "must be an RFC 3339 time such as 2027-01-31T00:00:00Z";
    for (bad, errors) in [
        (
            json!({"start": "2026-12-01T00:00:00Z", "end": "2026-11-01T00:00:00Z"}),
            json!([{"path": "billing_period.end", "message": "must be after start"}]),
        ),
        (
            json!({"start": "2026-12-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"}),
            json!([{"path": "billing_period.end", "message": "must be after start"}]),
        ),
        (
            // Seconds where days were meant.
            json!({"start": "2026-12-01T00:00:00Z", "end": "2026-12-01T00:00:30Z"}),
            json!([{"path": "billing_period.end", "message": "must be at least 1 day after start"}]),
        ),
        (
            json!({"start": "2026-12-01T00:00:00Z", "end": "2026-12-01T23:59:59.999Z"}),
            json!([{"path": "billing_period.end", "message": "must be at least 1 day after start"}]),
        ),
        (
            json!({"start": "2026-11-01T00:00:00Z", "end": "2027-11-03T00:00:00Z"}),
            json!([{"path": "billing_period.end", "message": "must be at most 366 days after start"}]),
        ),
        (
            json!({"start": "yesterday"}),
            json!([
                {"path": "billing_period.start", "message": rfc3339},
                {"path": "billing_period.end", "message": "is required"}
            ]),
        ),
        (
            json!({"start": 1_793_491_200_000_i64, "end": "1969-12-31T23:59:59Z"}),
            json!([
                {"path": "billing_period.start", "message": rfc3339},
                {"path": "billing_period.end", "message": rfc3339}
            ]),
        ),
        (
            // Not RFC 3339: no offset, a space for the T.
            json!({"start": "2026-11-01T00:00:00", "end": "2026-12-01 00:00:00Z"}),
            json!([
                {"path": "billing_period.start", "message": rfc3339},
                {"path": "billing_period.end", "message": rfc3339}
            ]),
        ),
        (
            json!({"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z", "tz": "UTC"}),
            json!([{"path": "billing_period.tz", "message": "unknown field"}]),
        ),
        (
            json!("monthly"),
            json!([{"path": "billing_period", "message": "must be an object {start, end} or null"}]),
        ),
    ] {
        let (status, problem, _) = call(
            &app,
            "PATCH",
            &path,
            admin,
            Some(json!({"billing_period": bad})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        assert_eq!(problem["errors"], errors, "{bad}");
    }
    // Creation does not take one: the subscription (or an admin) sets it later.
    let body = json!({"name": "B", "email": "b@b.example", "plan_id": customer["plan_id"],
                      "billing_period": november});
    let (status, problem, _) = call(&app, "POST", "/v1/customers", admin, Some(body)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        problem["errors"],
        json!([{"path": "billing_period", "message": "unknown field"}])
    );
    let (_, read, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
    assert_eq!(
        read["billing_period"],
        json!({"start": "2027-12-02T00:00:00.000Z", "end": "2028-12-02T00:00:00.000Z"}),
        "refused changes changed nothing"
    );
}

on_both_backends!(
    upgrade_urls_are_set_cleared_refused_and_published,
    billing_periods_are_set_cleared_refused_and_published,
);
