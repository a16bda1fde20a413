//! `/v1/customers`: create, list (cursor pagination), read, change (plan, state, contact).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use tollgate_model::FieldError;
use tollgate_model::customer::{BillingPeriod, Customer, CustomerStatus};
use tollgate_model::feed::PeriodMs;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Caller;
use super::body::{Object, Page, Query, error, page, page_limit, rfc3339_ms, unknown_fields};
use super::error::ApiError;
use super::openapi::{CreateProblems, ListProblems, ReadProblems, UpdateProblems};
use super::plans::ListQuery;
use crate::store::StoreError;
use crate::store::customers::{CustomerError, CustomerPatch, NewCustomer};

/// The fields a customer body may have (`status` and `billing_period` only when changing one).
pub const FIELDS: [&str; 5] = ["name", "email", "plan_id", "status", "billing_period"];
/// Longest billing period accepted: a year, as subscriptions bill at most yearly.
pub const MAX_BILLING_PERIOD_MS: i64 = 366 * 86_400_000;
/// The shortest billing period: a day, the shortest interval billing providers bill in (Stripe's
/// `interval: day`). A shorter one is an admin's mistake (seconds typed for days), and a
/// period that has ended goes on in periods of its length, resetting the quota each time.
pub const MIN_BILLING_PERIOD_MS: i64 = 86_400_000;

/// Body of `POST /v1/customers`.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Acme", "email": "billing@acme.example", "plan_id": "plan_0192f0c4e1a37f4c8d2b6a9e01234567"}))]
pub struct NewCustomerBody {
    /// Display name, 1 to 200 characters.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// Contact address, unique.
    #[schema(format = "email", max_length = 254)]
    pub email: String,
    /// An active plan's id.
    #[schema(pattern = "^plan_")]
    pub plan_id: String,
}

/// Body of `PATCH /v1/customers/{id}`: the fields to change.
#[derive(Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerPatchBody {
    /// New display name.
    #[schema(required = false, min_length = 1, max_length = 200)]
    pub name: String,
    /// New contact address.
    #[schema(required = false, format = "email", max_length = 254)]
    pub email: String,
    /// Another active plan: takes effect on the next request.
    #[schema(required = false, pattern = "^plan_")]
    pub plan_id: String,
    /// `suspended` refuses the customer's calls; `active` serves them again.
    #[schema(required = false)]
    pub status: CustomerStatus,
    /// The subscription's billing period, which the quota counts in (at most 366 days);
    /// `null` removes it (the quota then counts per calendar month in UTC).
    pub billing_period: Option<BillingPeriod>,
}

/// Creates a customer on a plan.
#[utoipa::path(post, operation_id = "createCustomer", path = "/v1/customers", tag = "customers",
    request_body = NewCustomerBody,
    responses((status = 201, description = "Created", body = Customer,
        headers(("Location" = String, description = "The customer's URL"))), CreateProblems))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Object(fields): Object,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let customer = new_customer(&fields).map_err(ApiError::Invalid)?;
    let created = state
        .store
        .create_customer(customer, &caller.actor)
        .await
        .map_err(customer_error)?;
    let location = format!("/v1/customers/{}", created.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response())
}

/// Lists customers, oldest first.
#[utoipa::path(get, operation_id = "listCustomers", path = "/v1/customers", tag = "customers", params(ListQuery),
    responses((status = 200, description = "A page of customers", body = Page<Customer>), ListProblems))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<Customer>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let customers = state
        .store
        .customers(limit + 1, query.cursor.as_deref())
        .await?;
    Ok(page(customers, limit, |c| c.id.clone()))
}

/// Reads a customer.
#[utoipa::path(get, operation_id = "getCustomer", path = "/v1/customers/{id}", tag = "customers", params(("id" = String, Path)),
    responses((status = 200, description = "The customer", body = Customer), ReadProblems))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let customer = state
        .store
        .customer(&id)
        .await
        .map_err(|e| customer_error(e.into()))?;
    Ok(Json(customer).into_response())
}

/// Changes a customer: contact, plan or state.
#[utoipa::path(patch, operation_id = "updateCustomer", path = "/v1/customers/{id}", tag = "customers", params(("id" = String, Path)),
    request_body = CustomerPatchBody,
    responses((status = 200, description = "The customer as changed", body = Customer), UpdateProblems))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Object(fields): Object,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let patch = customer_patch(&fields).map_err(ApiError::Invalid)?;
    let customer = state
        .store
        .update_customer(&id, patch, &caller.actor)
        .await
        .map_err(customer_error)?;
    Ok(Json(customer).into_response())
}

fn customer_error(error: CustomerError) -> ApiError {
    match error {
        CustomerError::NoSuchPlan => ApiError::Invalid(vec![FieldError {
            path: "plan_id".into(),
            message: "no active plan has this id".into(),
        }]),
        CustomerError::Store(StoreError::NotFound) => ApiError::NotFound("customer"),
        CustomerError::Store(other) => other.into(),
    }
}

fn new_customer(fields: &Map<String, Value>) -> Result<NewCustomer, Vec<FieldError>> {
    let mut errors = Vec::new();
    unknown_fields(fields, &FIELDS[..3], "", &mut errors);
    let required = |key: &str, errors: &mut Vec<FieldError>| {
        let value = fields.get(key);
        if value.is_none() {
            errors.push(error(key, "is required"));
        }
        value
    };
    let name = required("name", &mut errors).and_then(|v| display_name(v, &mut errors));
    let email = required("email", &mut errors).and_then(|v| email(v, &mut errors));
    let plan_id = required("plan_id", &mut errors).and_then(|v| plan_id(v, &mut errors));
    match (name, email, plan_id) {
        (Some(name), Some(email), Some(plan_id)) if errors.is_empty() => Ok(NewCustomer {
            name,
            email,
            plan_id,
        }),
        _ => Err(errors),
    }
}

fn customer_patch(fields: &Map<String, Value>) -> Result<CustomerPatch, Vec<FieldError>> {
    let mut errors = Vec::new();
    unknown_fields(fields, &FIELDS, "", &mut errors);
    let patch = CustomerPatch {
        name: fields
            .get("name")
            .and_then(|v| display_name(v, &mut errors)),
        email: fields.get("email").and_then(|v| email(v, &mut errors)),
        plan_id: fields.get("plan_id").and_then(|v| plan_id(v, &mut errors)),
        status: fields.get("status").and_then(|v| {
            let status = v.as_str().and_then(CustomerStatus::parse);
            if status.is_none() {
                errors.push(error("status", "must be \"active\" or \"suspended\""));
            }
            status
        }),
        billing_period: fields
            .get("billing_period")
            .and_then(|v| billing_period(v, &mut errors)),
    };
    if errors.is_empty() {
        Ok(patch)
    } else {
        Err(errors)
    }
}

fn display_name(value: &Value, errors: &mut Vec<FieldError>) -> Option<String> {
    match value.as_str().map(str::trim) {
        Some(name)
            if (1..=200).contains(&name.chars().count()) && !name.chars().any(char::is_control) =>
        {
            Some(name.to_owned())
        }
        _ => {
            errors.push(error("name", "must be 1 to 200 characters of text"));
            None
        }
    }
}

fn email(value: &Value, errors: &mut Vec<FieldError>) -> Option<String> {
    let valid = value.as_str().filter(|email| {
        email.len() <= 254
            && !email.chars().any(|c| c.is_whitespace() || c.is_control())
            && email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && domain.contains('.') && !domain.contains('@')
            })
    });
    match valid {
        Some(email) => Some(email.to_ascii_lowercase()),
        None => {
            errors.push(error("email", "must be an email address"));
            None
        }
    }
}

fn plan_id(value: &Value, errors: &mut Vec<FieldError>) -> Option<String> {
    match value.as_str() {
        Some(id) if id.starts_with("plan_") => Some(id.to_owned()),
        _ => {
            errors.push(error("plan_id", "must be a plan id (plan_...)"));
            None
        }
    }
}

/// A billing period `{start, end}` (RFC 3339, end at least [`MIN_BILLING_PERIOD_MS`] and at
/// most [`MAX_BILLING_PERIOD_MS`] after start) or `null`.
fn billing_period(value: &Value, errors: &mut Vec<FieldError>) -> Option<Option<PeriodMs>> {
    if value.is_null() {
        return Some(None);
    }
    let Some(fields) = value.as_object() else {
        errors.push(error(
            "billing_period",
            "must be an object {start, end} or null",
        ));
        return None;
    };
    let before = errors.len();
    unknown_fields(fields, &["start", "end"], "billing_period.", errors);
    let mut time = |name: &str| {
        let path = format!("billing_period.{name}");
        match fields.get(name) {
            None => {
                errors.push(error(&path, "is required"));
                None
            }
            Some(value) => {
                let ms = value.as_str().and_then(rfc3339_ms);
                if ms.is_none() {
                    errors.push(error(
                        &path,
                        "must be an RFC 3339 time such as 2027-01-31T00:00:00Z",
                    ));
                }
                ms
            }
        }
    };
    let (start, end) = (time("start"), time("end"));
    if let (Some(start_ms), Some(end_ms)) = (start, end) {
        if end_ms <= start_ms {
            errors.push(error("billing_period.end", "must be after start"));
        } else if end_ms - start_ms < MIN_BILLING_PERIOD_MS {
            errors.push(error(
                "billing_period.end",
                "must be at least 1 day after start",
            ));
        } else if end_ms - start_ms > MAX_BILLING_PERIOD_MS {
            errors.push(error(
                "billing_period.end",
                "must be at most 366 days after start",
            ));
        } else if errors.len() == before {
            return Some(Some(PeriodMs { start_ms, end_ms }));
        }
    }
    None
}
