//! The usage endpoints through the real router, on SQLite and Postgres, every answer checked
//! against the OpenAPI document: gateways post batches and read a period's sums; admins and
//! viewers read a customer's current period, quota and daily roll-up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod contract;
#[macro_use]
mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use support::{Db, call, customer_on_a_plan, problem};
use tollgate_control_plane::calendar::{MS_PER_DAY, day_number, format_day, month_containing};
use tollgate_control_plane::store::{now_ms, rfc3339};
use tower::ServiceExt;

/// An event as a gateway sends it: one unit, 10 bytes in, 100 out.
fn event(n: u64, customer_id: &str, route: &str, at_ms: i64) -> Value {
    json!({
        "id": format!("evt_{n:032x}"), "request_id": format!("req-{n}"),
        "customer_id": customer_id, "key_id": null, "route": route, "method": "GET",
        "status": 200, "latency_us": 1500, "bytes_in": 10, "bytes_out": 100,
        "at_ms": at_ms, "units": 1, "overage": 0
    })
}

fn cus(n: u64) -> String {
    format!("cus_{n:032x}")
}

async fn gateways_post_batches_once_and_read_a_period(db: &Db) {
    let app = db.app();
    let token = db.gateway_token().await;
    let gateway = Some(token.as_str());
    let at = 1_796_083_200_000_i64;
    let batch = json!({"events": [
        event(1, &cus(1), "orders", at),
        event(2, &cus(1), "orders", at + 1),
        event(3, &cus(9), "users", at + 2),
    ]});
    let (status, body, _) = call(
        &app,
        "POST",
        "/v1/gateway/usage",
        gateway,
        Some(batch.clone()),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"inserted": 3, "duplicates": 0}))
    );
    let (status, body, _) = call(
        &app,
        "POST",
        "/v1/gateway/usage",
        gateway,
        Some(batch.clone()),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"inserted": 0, "duplicates": 3}))
    );

    // Idempotency-Key is not read here: a retry gets the true answer, not a replayed one.
    for _ in 0..2 {
        let request = Request::builder()
            .method("POST")
            .uri("/v1/gateway/usage")
            .header("authorization", format!("Bearer {token}"))
            .header("idempotency-key", "batch-1")
            .body(Body::from(
                json!({"events": [event(4, &cus(1), "orders", at)]}).to_string(),
            ))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert!(response.headers().get("idempotent-replayed").is_none());
    }

    // The period's sums, the customer nobody created (cus 9) included.
    let period = |customer: &str, start: i64, end: i64| {
        format!("/v1/gateway/usage/period?customer_id={customer}&start_ms={start}&end_ms={end}")
    };
    let (status, sums, _) = call(&app, "GET", &period(&cus(1), at, at + 2), gateway, None).await;
    assert_eq!(
        (status, sums),
        (
            StatusCode::OK,
            json!({"start_ms": at, "end_ms": at + 2, "units": 3, "overage": 0})
        )
    );
    let (_, sums, _) = call(
        &app,
        "GET",
        &period(&cus(9), 0, 86_400_000 * 366),
        gateway,
        None,
    )
    .await;
    assert_eq!(sums["units"], 0, "outside the period");
    let (_, sums, _) = call(&app, "GET", &period(&cus(9), at, at + 3), gateway, None).await;
    assert_eq!(sums["units"], 1);

    // Only gateway tokens post usage and read periods.
    let gateway_only = problem(
        "forbidden",
        "Forbidden",
        403,
        "/v1/gateway is for gateway tokens (role \"gateway\")",
    );
    for token in [&db.admin, &db.viewer] {
        let (status, body, _) = call(
            &app,
            "POST",
            "/v1/gateway/usage",
            Some(token),
            Some(batch.clone()),
        )
        .await;
        assert_eq!((status, &body), (StatusCode::FORBIDDEN, &gateway_only));
        let (status, _, _) =
            call(&app, "GET", &period(&cus(1), at, at + 2), Some(token), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let (status, _, _) = call(&app, "POST", "/v1/gateway/usage", None, Some(batch)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Counted by outcome.
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
    let text = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8(text.to_vec()).unwrap();
    for line in [
        r#"tollgate_control_plane_usage_events_total{outcome="inserted"} 4"#,
        r#"tollgate_control_plane_usage_events_total{outcome="duplicate"} 4"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

async fn a_bad_batch_is_refused_whole_with_every_path(db: &Db) {
    let app = db.app();
    let gateway = db.gateway_token().await;
    let gateway = Some(gateway.as_str());
    let at = 1_796_083_200_000_i64;
    let mut bad = event(2, &cus(1), "orders", at);
    bad["id"] = json!("evt_1");
    bad["status"] = json!(99);
    bad["units"] = json!(1);
    bad["overage"] = json!(2);
    let mut unnamed = event(3, &cus(1), "", at);
    unnamed.as_object_mut().unwrap().remove("customer_id");
    let body = json!({"events": [event(1, &cus(1), "orders", at), bad, unnamed, 7]});
    let (status, problem_body, _) =
        call(&app, "POST", "/v1/gateway/usage", gateway, Some(body)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem_body["detail"], "6 invalid field(s)");
    assert_eq!(
        problem_body["errors"],
        json!([
            {"path": "events[1].id", "message": "must be evt_ and 32 lowercase hex digits"},
            {"path": "events[1].status", "message": "must be an integer from 100 to 599"},
            {"path": "events[1].overage", "message": "must not be more than units"},
            {"path": "events[2].customer_id", "message": "is required"},
            {"path": "events[2].route", "message": "must be 1 to 128 visible ASCII characters"},
            {"path": "events[3]", "message": "must be an event object"}
        ])
    );
    // Nothing of it was stored, not even the good event.
    let path = format!(
        "/v1/gateway/usage/period?customer_id={}&start_ms={at}&end_ms={}",
        cus(1),
        at + 1
    );
    let (_, sums, _) = call(&app, "GET", &path, gateway, None).await;
    assert_eq!(sums["units"], 0);

    for (body, errors) in [
        (
            json!({"events": []}),
            json!([{"path": "events", "message": "must hold 1 to 5000 events, not 0"}]),
        ),
        (
            json!({"events": vec![event(1, &cus(1), "orders", at); 5001]}),
            json!([{"path": "events", "message": "must hold 1 to 5000 events, not 5001"}]),
        ),
        (
            json!({"events": {}, "gateway": "gw-1"}),
            json!([
                {"path": "gateway", "message": "unknown field"},
                {"path": "events", "message": "must be an array of events"}
            ]),
        ),
    ] {
        let (status, answer, _) =
            call(&app, "POST", "/v1/gateway/usage", gateway, Some(body)).await;
        assert_eq!(
            (status, &answer["errors"]),
            (StatusCode::UNPROCESSABLE_ENTITY, &errors)
        );
    }
    let (status, _, _) = call(&app, "POST", "/v1/gateway/usage", gateway, Some(json!([1]))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // 5000 events are well past the 1 MiB of other endpoints, and accepted; 8 MiB is the limit.
    let full: Vec<Value> = (0..5000).map(|n| event(n, &cus(2), "orders", at)).collect();
    let full = json!({ "events": full });
    assert!(full.to_string().len() > 1 << 20);
    let (status, stored, _) = call(&app, "POST", "/v1/gateway/usage", gateway, Some(full)).await;
    assert_eq!(
        (status, stored),
        (StatusCode::OK, json!({"inserted": 5000, "duplicates": 0}))
    );
    let huge = json!({"events": [], "padding": "x".repeat(8 << 20)});
    let (status, answer, _) = call(&app, "POST", "/v1/gateway/usage", gateway, Some(huge)).await;
    assert_eq!(
        (status, answer),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            problem(
                "body-too-large",
                "Body too large",
                413,
                "the body is larger than 8388608 bytes"
            )
        )
    );

    // The period query.
    let period = |query: &str| format!("/v1/gateway/usage/period?{query}");
    for (query, errors) in [
        (
            "customer_id=cus_1&start_ms=-1&end_ms=-1".to_owned(),
            json!([
                {"path": "customer_id", "message": "must be cus_ and 32 lowercase hex digits"},
                {"path": "start_ms", "message": "must not be negative"},
                {"path": "end_ms", "message": "must be after start_ms"}
            ]),
        ),
        (
            format!(
                "customer_id={}&start_ms={}&end_ms={}",
                cus(1),
                i64::MIN,
                i64::MAX
            ),
            json!([
                {"path": "start_ms", "message": "must not be negative"},
                {"path": "end_ms", "message": "must be at most 366 days after start_ms"}
            ]),
        ),
        (
            format!(
                "customer_id={}&start_ms=0&end_ms={}",
                cus(1),
                366 * 86_400_000_i64 + 1
            ),
            json!([{"path": "end_ms", "message": "must be at most 366 days after start_ms"}]),
        ),
    ] {
        let (status, answer, _) = call(&app, "GET", &period(&query), gateway, None).await;
        assert_eq!(
            (status, &answer["errors"]),
            (StatusCode::UNPROCESSABLE_ENTITY, &errors)
        );
    }
    let (status, _, _) = call(
        &app,
        "GET",
        &period(&format!("customer_id={}&start_ms=0", cus(1))),
        gateway,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "end_ms is required");
}

/// Posts `events` with a gateway token; asserts all were new.
async fn post(db: &Db, gateway: &str, events: Vec<Value>) {
    let n = events.len();
    let (status, stored, _) = call(
        &db.app(),
        "POST",
        "/v1/gateway/usage",
        Some(gateway),
        Some(json!({ "events": events })),
    )
    .await;
    assert_eq!(
        (status, stored),
        (StatusCode::OK, json!({"inserted": n, "duplicates": 0}))
    );
}

async fn the_usage_view_shows_the_period_quota_and_days(db: &Db) {
    let app = db.app();
    let gateway = db.gateway_token().await;
    let (plan, customer) = customer_on_a_plan(&app, db).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let plan_path = format!("/v1/plans/{}", plan["id"].as_str().unwrap());
    let path = format!("/v1/customers/{id}/usage");
    // A five-day billing period around now: two days before today, today, two days after.
    let today = day_number(now_ms()) * MS_PER_DAY;
    let (start, end) = (today - 2 * MS_PER_DAY, today + 3 * MS_PER_DAY);
    let period = json!({"start": rfc3339(start), "end": rfc3339(end)});
    let (status, _, _) = call(
        &app,
        "PATCH",
        &format!("/v1/customers/{id}"),
        Some(&db.admin),
        Some(json!({"billing_period": period})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let day = |ms: i64| format_day(day_number(ms));
    let mut failed = event(3, &id, "users", start + MS_PER_DAY + 5);
    (failed["status"], failed["units"], failed["bytes_out"]) = (json!(502), json!(0), json!(0));
    let mut events = vec![
        event(1, &id, "orders", start - 1),
        event(2, &id, "orders", start),
        failed,
        event(4, &id, "orders", start + MS_PER_DAY + 6),
        event(5, &id, "orders", end - 1),
        event(6, &id, "orders", end),
        event(7, &cus(1), "orders", start),
    ];
    (events[1]["units"], events[3]["units"], events[4]["units"]) = (json!(2), json!(3), json!(4));
    post(db, &gateway, events).await;

    let row = |ms: i64, route: &str, counts: [u64; 6]| {
        json!({"day": day(ms), "route": route, "requests": counts[0], "units": counts[1],
               "overage": counts[2], "errors": counts[3], "bytes_in": counts[4], "bytes_out": counts[5]})
    };
    let in_period = vec![
        row(start, "orders", [1, 2, 0, 0, 10, 100]),
        row(start + MS_PER_DAY, "orders", [1, 3, 0, 0, 10, 100]),
        row(start + MS_PER_DAY, "users", [1, 0, 0, 1, 10, 0]),
        row(end - 1, "orders", [1, 4, 0, 0, 10, 100]),
    ];
    let (status, usage, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(
        usage,
        json!({
            "period": {"start": rfc3339(start), "end": rfc3339(end)},
            "quota": 10000, "hard": true, "used": 9, "remaining": 9991, "overage": 0,
            "days": in_period
        })
    );

    // Other days on request, both ends included.
    let wider = format!("{path}?from={}&to={}", day(start - 1), day(end));
    let (_, usage, _) = call(&app, "GET", &wider, Some(&db.admin), None).await;
    let mut days = vec![row(start - 1, "orders", [1, 1, 0, 0, 10, 100])];
    days.extend(in_period.iter().cloned());
    days.push(row(end, "orders", [1, 1, 0, 0, 10, 100]));
    assert_eq!(usage["days"], json!(days));
    assert_eq!(
        usage["used"], 9,
        "the period's use, whatever days are listed"
    );
    let one_day = format!("{path}?from={0}&to={0}", day(start));
    let (_, usage, _) = call(&app, "GET", &one_day, Some(&db.viewer), None).await;
    assert_eq!(usage["days"], json!([in_period[0]]));

    // A soft quota, spent: nothing remains (never negative), the overage shows.
    let soft = json!({"quota": {"requests": 5, "hard": false}});
    call(&app, "PATCH", &plan_path, Some(&db.admin), Some(soft)).await;
    let mut over = event(8, &id, "orders", start + 10);
    (over["units"], over["overage"]) = (json!(2), json!(2));
    post(db, &gateway, vec![over]).await;
    let (_, usage, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
    assert_eq!(
        (
            &usage["quota"],
            &usage["hard"],
            &usage["used"],
            &usage["remaining"],
            &usage["overage"]
        ),
        (&json!(5), &json!(false), &json!(11), &json!(0), &json!(2))
    );
    assert_eq!(
        usage["days"][0],
        row(start, "orders", [2, 4, 2, 0, 20, 200])
    );

    // No quota: nothing to compare with.
    call(
        &app,
        "PATCH",
        &plan_path,
        Some(&db.admin),
        Some(json!({"quota": null})),
    )
    .await;
    let (_, usage, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
    assert_eq!(
        (
            &usage["quota"],
            &usage["hard"],
            &usage["used"],
            &usage["remaining"]
        ),
        (&Value::Null, &Value::Null, &json!(11), &Value::Null)
    );

    // Without a billing period covering now, the calendar month in UTC.
    for period in [
        json!(null),
        json!({"start": rfc3339(end), "end": rfc3339(end + MS_PER_DAY)}),
    ] {
        call(
            &app,
            "PATCH",
            &format!("/v1/customers/{id}"),
            Some(&db.admin),
            Some(json!({"billing_period": period})),
        )
        .await;
        let month = month_containing(now_ms());
        let (_, usage, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
        assert_eq!(
            usage["period"],
            json!({"start": rfc3339(month.start_ms), "end": rfc3339(month.end_ms)})
        );
        assert!(
            usage["period"]["start"]
                .as_str()
                .unwrap()
                .ends_with("-01T00:00:00.000Z")
        );
    }
}

async fn the_usage_view_refuses_bad_days_and_unknown_customers(db: &Db) {
    let app = db.app();
    let (_, customer) = customer_on_a_plan(&app, db).await;
    let path = format!("/v1/customers/{}/usage", customer["id"].as_str().unwrap());
    let date = "must be a date YYYY-MM-DD";
    for (query, errors) in [
        (
            "from=2026-02-30",
            json!([{"path": "from", "message": date}]),
        ),
        (
            "from=yesterday&to=2026-1-1",
            json!([{"path": "from", "message": date}, {"path": "to", "message": date}]),
        ),
        (
            "from=2026-12-02&to=2026-12-01",
            json!([{"path": "to", "message": "must not be before from"}]),
        ),
        (
            "from=2026-01-01&to=2027-01-03",
            json!([{"path": "to", "message": "must be within 367 days of from, both included"}]),
        ),
    ] {
        let (status, answer, _) = call(
            &app,
            "GET",
            &format!("{path}?{query}"),
            Some(&db.viewer),
            None,
        )
        .await;
        assert_eq!(
            (status, &answer["errors"]),
            (StatusCode::UNPROCESSABLE_ENTITY, &errors),
            "{query}"
        );
    }
    // One end sent: the refusal names it, and the default of the other it was checked against.
    for (query, field, message) in [
        (
            "to=2020-01-01",
            "to",
            "must not be before from, which defaults to the period's first day, 20",
        ),
        (
            "from=2099-01-01",
            "from",
            "must not be after to, which defaults to the period's last day, 20",
        ),
        (
            "from=2020-01-01",
            "from",
            "must be within 367 days of to, which defaults to the period's last day, 20",
        ),
    ] {
        let (status, answer, _) = call(
            &app,
            "GET",
            &format!("{path}?{query}"),
            Some(&db.viewer),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert_eq!(answer["errors"][0]["path"], field, "{query}");
        let said = answer["errors"][0]["message"].as_str().unwrap();
        assert!(said.starts_with(message), "{query}: {said}");
    }
    // 367 days, both ends included, is the widest range.
    let (status, _, _) = call(
        &app,
        "GET",
        &format!("{path}?from=2026-01-01&to=2027-01-02"),
        Some(&db.viewer),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The longest billing period (366 days) starting at noon touches 367 UTC days: its view,
    // asked without days, lists them all.
    let start = (day_number(now_ms()) - 100) * MS_PER_DAY + MS_PER_DAY / 2;
    let period = json!({"start": rfc3339(start), "end": rfc3339(start + 366 * MS_PER_DAY)});
    let (status, _, _) = call(
        &app,
        "PATCH",
        &format!("/v1/customers/{}", customer["id"].as_str().unwrap()),
        Some(&db.admin),
        Some(json!({"billing_period": period})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer, _) = call(&app, "GET", &path, Some(&db.viewer), None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["period"], period);
    let (status, answer, _) = call(
        &app,
        "GET",
        "/v1/customers/cus_nope/usage",
        Some(&db.viewer),
        None,
    )
    .await;
    assert_eq!(
        (status, answer),
        (
            StatusCode::NOT_FOUND,
            problem("not-found", "Not found", 404, "no such customer")
        )
    );
    let gateway = db.gateway_token().await;
    let (status, answer, _) = call(&app, "GET", &path, Some(&gateway), None).await;
    assert_eq!(
        (status, answer),
        (
            StatusCode::FORBIDDEN,
            problem(
                "forbidden",
                "Forbidden",
                403,
                "gateway tokens may only use /v1/gateway"
            )
        )
    );
    let (status, _, _) = call(&app, "GET", &path, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

on_both_backends!(
    gateways_post_batches_once_and_read_a_period,
    a_bad_batch_is_refused_whole_with_every_path,
    the_usage_view_shows_the_period_quota_and_days,
    the_usage_view_refuses_bad_days_and_unknown_customers,
);
