//! RFC 9457 problem details (`application/problem+json`).
//!
//! Every error a Tollgate component produces itself is one of these. The `type` is a stable URN
//! (`urn:tollgate:problem:<slug>`) that clients can match on; `title` is fixed per type, `detail`
//! explains this occurrence, and `request_id` ties the body to the `X-Request-Id` header and the
//! access log. Bodies never carry internal messages: callers choose `detail` deliberately.

use serde::{Deserialize, Serialize};

/// The media type of a problem body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The prefix of every problem `type` Tollgate emits.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:tollgate:problem:";

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    /// A URI reference identifying the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the problem type; the same for every occurrence.
    pub title: String,
    /// The HTTP status code of this occurrence.
    pub status: u16,
    /// An explanation of this occurrence, safe to show to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The request id of the request that failed, as in the `X-Request-Id` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// For validation problems: every invalid field with its path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For `quota-exceeded`: where the customer can move to a larger plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_url: Option<String>,
}

/// One invalid field of a request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FieldError {
    /// JSON path of the field, such as `rate_limits[0].requests`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl Problem {
    /// A problem of type `urn:tollgate:problem:{slug}`.
    pub fn new(slug: &str, title: &str, status: u16) -> Self {
        Self {
            kind: format!("{PROBLEM_TYPE_PREFIX}{slug}"),
            title: title.to_owned(),
            status,
            detail: None,
            request_id: None,
            errors: Vec::new(),
            upgrade_url: None,
        }
    }

    /// Sets the occurrence-specific explanation.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Sets the request id the problem belongs to.
    #[must_use]
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// Adds the invalid fields of a validation problem.
    #[must_use]
    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    /// Sets the URL where a customer out of quota can upgrade.
    #[must_use]
    pub fn with_upgrade_url(mut self, url: Option<String>) -> Self {
        self.upgrade_url = url;
        self
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and an integer cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_rfc_9457_member_names() {
        let body = Problem::new("no-route", "No route matches this request", 404)
            .with_detail("no route for GET /nope")
            .with_request_id("abc");
        let json: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "urn:tollgate:problem:no-route",
                "title": "No route matches this request",
                "status": 404,
                "detail": "no route for GET /nope",
                "request_id": "abc",
            })
        );
    }

    #[test]
    fn omits_absent_members() {
        let body = Problem::new("x", "X", 500).to_json();
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"type":"urn:tollgate:problem:x","title":"X","status":500}"#
        );
    }
}
