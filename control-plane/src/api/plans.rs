//! `/v1/plans`: create, list (cursor pagination), read, change, delete (archive when in use).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value};
use tollgate_model::FieldError;
use tollgate_model::plan::{Plan, Price, Quota, RateLimit};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Caller;
use super::body::{
    Object, Page, Query, error, name, page, page_limit, unknown_fields, upgrade_url,
};
use super::error::ApiError;
use super::openapi::{CreateProblems, DeleteProblems, ListProblems, ReadProblems, UpdateProblems};
use crate::store::plans::{Deleted, NewPlan, PlanPatch};

/// Body of `POST /v1/plans`.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "pro", "rate_limits": [{"requests": 20, "window_seconds": 60}], "quota": {"requests": 10000, "hard": true}, "price": {"currency": "usd", "unit_amount_micros": 1000}, "upgrade_url": "https://example.com/pricing"}))]
pub struct NewPlanBody {
    /// Unique name: 1 to 64 letters, digits, `-`, `_` or `.`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    pub name: String,
    /// Windows that all apply at once; no two with the same `window_seconds`.
    #[schema(required = false)]
    pub rate_limits: Vec<RateLimit>,
    /// Requests per billing period; `null` for none.
    pub quota: Option<Quota>,
    /// Price per billable unit; `null` for none.
    pub price: Option<Price>,
    /// Where a customer out of quota can upgrade (given in the quota problem): an absolute
    /// `https://` or `http://` URL without whitespace; `null` for none.
    #[schema(format = "uri", max_length = 2048)]
    pub upgrade_url: Option<String>,
}

/// Body of `PATCH /v1/plans/{id}`: the fields to change.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanPatchBody {
    /// New unique name.
    #[schema(
        required = false,
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9._-]+$"
    )]
    pub name: String,
    /// New windows, replacing the old ones.
    #[schema(required = false)]
    pub rate_limits: Vec<RateLimit>,
    /// New quota; `null` removes it.
    pub quota: Option<Quota>,
    /// New price; `null` removes it.
    pub price: Option<Price>,
    /// New upgrade URL; `null` removes it.
    #[schema(format = "uri", max_length = 2048)]
    pub upgrade_url: Option<String>,
}

/// Longest window accepted: 31 days.
const MAX_WINDOW_SECONDS: u64 = 31 * 24 * 3600;

/// Creates a plan.
#[utoipa::path(post, operation_id = "createPlan", path = "/v1/plans", tag = "plans",
    request_body = NewPlanBody,
    responses((status = 201, description = "Created", body = Plan,
        headers(("Location" = String, description = "The plan's URL"))), CreateProblems))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Object(fields): Object,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let plan = new_plan(&fields).map_err(ApiError::Invalid)?;
    let created = state.store.create_plan(plan, &caller.actor).await?;
    let location = format!("/v1/plans/{}", created.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response())
}

/// Query of every listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Lists plans, oldest first.
#[utoipa::path(get, operation_id = "listPlans", path = "/v1/plans", tag = "plans", params(ListQuery),
    responses((status = 200, description = "A page of plans", body = Page<Plan>), ListProblems))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<Plan>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let plans = state
        .store
        .plans(limit + 1, query.cursor.as_deref())
        .await?;
    Ok(page(plans, limit, |p| p.id.clone()))
}

/// Reads a plan.
#[utoipa::path(get, operation_id = "getPlan", path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path)),
    responses((status = 200, description = "The plan", body = Plan), ReadProblems))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let plan = state
        .store
        .plan(&id)
        .await
        .map_err(ApiError::from_store("plan"))?;
    Ok(Json(plan).into_response())
}

/// Changes a plan; customers on it get the change at once.
#[utoipa::path(patch, operation_id = "updatePlan", path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path)),
    request_body = PlanPatchBody,
    responses((status = 200, description = "The plan as changed", body = Plan), UpdateProblems))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Object(fields): Object,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let patch = plan_patch(&fields).map_err(ApiError::Invalid)?;
    let plan = state
        .store
        .update_plan(&id, patch, &caller.actor)
        .await
        .map_err(ApiError::from_store("plan"))?;
    Ok(Json(plan).into_response())
}

/// Deletes a plan: 204 when removed, 200 with the plan when archived because customers use it.
#[utoipa::path(delete, operation_id = "deletePlan", path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path)),
    responses((status = 204, description = "Removed"),
        (status = 200, description = "Archived: customers still use it", body = Plan),
        DeleteProblems))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    match state
        .store
        .delete_plan(&id, &caller.actor)
        .await
        .map_err(ApiError::from_store("plan"))?
    {
        Deleted::Removed => Ok(StatusCode::NO_CONTENT.into_response()),
        Deleted::Archived(plan) => Ok(Json(plan).into_response()),
    }
}

/// The fields a plan body may have.
pub const PLAN_FIELDS: [&str; 5] = ["name", "rate_limits", "quota", "price", "upgrade_url"];

fn new_plan(fields: &Map<String, Value>) -> Result<NewPlan, Vec<FieldError>> {
    let mut errors = Vec::new();
    unknown_fields(fields, &PLAN_FIELDS, "", &mut errors);
    let name = match fields.get("name") {
        Some(value) => name(value, "name", &mut errors),
        None => {
            errors.push(error("name", "is required"));
            None
        }
    };
    let rate_limits = fields
        .get("rate_limits")
        .map_or(Some(Vec::new()), |v| rate_limits(v, &mut errors));
    let quota = fields
        .get("quota")
        .map_or(Some(None), |v| quota(v, &mut errors));
    let price = fields
        .get("price")
        .map_or(Some(None), |v| price(v, &mut errors));
    let upgrade_url = fields
        .get("upgrade_url")
        .map_or(Some(None), |v| upgrade_url(v, &mut errors));
    match (name, rate_limits, quota, price, upgrade_url) {
        (Some(name), Some(rate_limits), Some(quota), Some(price), Some(upgrade_url))
            if errors.is_empty() =>
        {
            Ok(NewPlan {
                name,
                rate_limits,
                quota,
                price,
                upgrade_url,
            })
        }
        _ => Err(errors),
    }
}

fn plan_patch(fields: &Map<String, Value>) -> Result<PlanPatch, Vec<FieldError>> {
    let mut errors = Vec::new();
    unknown_fields(fields, &PLAN_FIELDS, "", &mut errors);
    let patch = PlanPatch {
        name: fields
            .get("name")
            .and_then(|v| name(v, "name", &mut errors)),
        rate_limits: fields
            .get("rate_limits")
            .and_then(|v| rate_limits(v, &mut errors)),
        quota: fields.get("quota").and_then(|v| quota(v, &mut errors)),
        price: fields.get("price").and_then(|v| price(v, &mut errors)),
        upgrade_url: fields
            .get("upgrade_url")
            .and_then(|v| upgrade_url(v, &mut errors)),
    };
    if errors.is_empty() {
        Ok(patch)
    } else {
        Err(errors)
    }
}

fn positive(
    value: Option<&Value>,
    path: &str,
    max: u64,
    errors: &mut Vec<FieldError>,
) -> Option<u64> {
    match value.and_then(Value::as_u64) {
        Some(n) if (1..=max).contains(&n) => Some(n),
        _ => {
            errors.push(error(path, &format!("must be an integer from 1 to {max}")));
            None
        }
    }
}

fn rate_limits(value: &Value, errors: &mut Vec<FieldError>) -> Option<Vec<RateLimit>> {
    let Some(items) = value.as_array() else {
        errors.push(error(
            "rate_limits",
            "must be an array of {requests, window_seconds}",
        ));
        return None;
    };
    let before = errors.len();
    let mut limits = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("rate_limits[{i}]");
        let Some(fields) = item.as_object() else {
            errors.push(error(&path, "must be an object {requests, window_seconds}"));
            continue;
        };
        unknown_fields(
            fields,
            &["requests", "window_seconds"],
            &format!("{path}."),
            errors,
        );
        let requests = positive(
            fields.get("requests"),
            &format!("{path}.requests"),
            u64::from(u32::MAX),
            errors,
        );
        let window = positive(
            fields.get("window_seconds"),
            &format!("{path}.window_seconds"),
            MAX_WINDOW_SECONDS,
            errors,
        );
        if let (Some(requests), Some(window_seconds)) = (requests, window) {
            limits.push(RateLimit {
                requests,
                window_seconds,
            });
        }
    }
    let mut windows: Vec<u64> = limits.iter().map(|l| l.window_seconds).collect();
    windows.sort_unstable();
    if windows.windows(2).any(|w| w[0] == w[1]) {
        errors.push(error(
            "rate_limits",
            "two limits have the same window_seconds",
        ));
    }
    (errors.len() == before).then_some(limits)
}

fn quota(value: &Value, errors: &mut Vec<FieldError>) -> Option<Option<Quota>> {
    if value.is_null() {
        return Some(None);
    }
    let Some(fields) = value.as_object() else {
        errors.push(error("quota", "must be an object {requests, hard} or null"));
        return None;
    };
    let before = errors.len();
    unknown_fields(fields, &["requests", "hard"], "quota.", errors);
    let requests = positive(
        fields.get("requests"),
        "quota.requests",
        i64::MAX as u64,
        errors,
    );
    let hard = match fields.get("hard") {
        None => Some(true),
        Some(Value::Bool(hard)) => Some(*hard),
        Some(_) => {
            errors.push(error("quota.hard", "must be true or false"));
            None
        }
    };
    match (requests, hard) {
        (Some(requests), Some(hard)) if errors.len() == before => {
            Some(Some(Quota { requests, hard }))
        }
        _ => None,
    }
}

fn price(value: &Value, errors: &mut Vec<FieldError>) -> Option<Option<Price>> {
    if value.is_null() {
        return Some(None);
    }
    let Some(fields) = value.as_object() else {
        errors.push(error(
            "price",
            "must be an object {currency, unit_amount_micros} or null",
        ));
        return None;
    };
    let before = errors.len();
    unknown_fields(
        fields,
        &["currency", "unit_amount_micros"],
        "price.",
        errors,
    );
    let currency = match fields.get("currency").and_then(Value::as_str) {
        Some(c) if c.len() == 3 && c.chars().all(|ch| ch.is_ascii_alphabetic()) => {
            Some(c.to_ascii_lowercase())
        }
        _ => {
            errors.push(error(
                "price.currency",
                "must be a three-letter ISO 4217 code such as \"usd\"",
            ));
            None
        }
    };
    let amount = match fields.get("unit_amount_micros").and_then(Value::as_u64) {
        Some(amount) if amount <= i64::MAX as u64 => Some(amount),
        _ => {
            errors.push(error(
                "price.unit_amount_micros",
                "must be a non-negative integer",
            ));
            None
        }
    };
    match (currency, amount) {
        (Some(currency), Some(unit_amount_micros)) if errors.len() == before => Some(Some(Price {
            currency,
            unit_amount_micros,
        })),
        _ => None,
    }
}
