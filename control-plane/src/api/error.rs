//! The one place the control plane turns failures into HTTP statuses and problem bodies.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tollgate_model::{FieldError, PROBLEM_CONTENT_TYPE, Problem};

use crate::store::StoreError;

/// An error an endpoint answers with.
#[derive(Debug)]
pub enum ApiError {
    /// 401: no token, or an unknown one.
    Unauthenticated,
    /// 403: the token's role may not do this; says why.
    Forbidden(&'static str),
    /// 404.
    NotFound(&'static str),
    /// 405: the path exists, the method does not.
    MethodNotAllowed,
    /// 409, with what collided.
    Conflict(String),
    /// 422, with every invalid field.
    Invalid(Vec<FieldError>),
    /// 400: the body or the query is not what the endpoint reads.
    BadRequest(String),
    /// 413: the body is larger than the limit, in bytes.
    TooLarge(usize),
    /// 500: logged, never shown.
    Internal(String),
}

impl ApiError {
    /// A store error as an answer, a missing row being a 404 for `what`: for `map_err`.
    pub fn from_store(what: &'static str) -> impl Fn(StoreError) -> ApiError {
        move |error| match error {
            StoreError::NotFound => ApiError::NotFound(what),
            other => other.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ApiError::NotFound("resource"),
            StoreError::Conflict(what) => ApiError::Conflict(what),
            StoreError::Database(error) => ApiError::Internal(error.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = match self {
            ApiError::Unauthenticated => {
                Problem::new("unauthenticated", "Authentication required", 401)
                    .with_detail(
                        "no token, or one this control plane does not know: send a token it issued \
                         (TOLLGATE_ADMIN_TOKEN, or POST /v1/admin-tokens) as Authorization: Bearer <token>",
                    )
            }
            ApiError::Forbidden(detail) => {
                Problem::new("forbidden", "Forbidden", 403).with_detail(detail)
            }
            ApiError::NotFound(what) => {
                Problem::new("not-found", "Not found", 404).with_detail(format!("no such {what}"))
            }
            ApiError::MethodNotAllowed => {
                Problem::new("method-not-allowed", "Method not allowed", 405)
                    .with_detail("this path does not take this method")
            }
            ApiError::Conflict(what) => Problem::new("conflict", "Conflict", 409).with_detail(what),
            ApiError::Invalid(errors) => Problem::new("validation", "Invalid request", 422)
                .with_detail(format!("{} invalid field(s)", errors.len()))
                .with_errors(errors),
            ApiError::BadRequest(detail) => {
                Problem::new("bad-request", "Bad request", 400).with_detail(detail)
            }
            ApiError::TooLarge(limit) => Problem::new("body-too-large", "Body too large", 413)
                .with_detail(format!("the body is larger than {limit} bytes")),
            ApiError::Internal(message) => {
                tracing::error!(%message, "internal error");
                Problem::new("internal", "Internal error", 500)
                    .with_detail("the control plane failed to handle the request")
            }
        };
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, PROBLEM_CONTENT_TYPE)],
            problem.to_json(),
        )
            .into_response()
    }
}
