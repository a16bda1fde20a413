//! The OpenAPI 3.1 document served at `/openapi.json`.
//!
//! It is generated from the code: every `/v1` route is registered through
//! `utoipa_axum::routes!`, which takes the path and methods from the handler's
//! `#[utoipa::path]`, so a route cannot be served without being documented. Response bodies are
//! the Rust types the handlers serialize; request bodies are the `*Body` types next to each
//! handler, whose fields a test compares with the fields the handler accepts.

use std::collections::BTreeMap;

use tollgate_model::PROBLEM_CONTENT_TYPE;
use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Required, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

/// The document's fixed parts; paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate control plane",
        description = "Plans, customers, API keys and admin tokens, the feed gateways follow and \
                       the usage they send. \
                       Errors are RFC 9457 problems (application/problem+json).",
        license(name = "Apache-2.0"),
    ),
    modifiers(&BearerTokens),
    security(("admin_token" = [])),
    components(schemas(tollgate_model::Problem, tollgate_model::FieldError)),
    tags(
        (name = "plans", description = "What customers buy"),
        (name = "customers", description = "Who calls through the gateway"),
        (name = "keys", description = "API keys of customers"),
        (name = "admin-tokens", description = "Tokens of admins, viewers and gateways"),
        (name = "audit", description = "Every change, with who made it"),
        (name = "gateway feed", description = "The snapshot and changes gateways follow (gateway tokens only)"),
        (name = "usage", description = "The usage ledger: batches gateways send, the period sums they rebuild quotas from, and a customer's usage"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An admin, viewer or gateway token (tga_ and 64 hex digits)",
                    ))
                    .build(),
            ),
        );
    }
}

/// What each problem status means, as documented.
const PROBLEMS: [(u16, &str); 8] = [
    (
        400,
        "The body or a query parameter is not what the endpoint reads",
    ),
    (401, "No token, or an unknown one"),
    (403, "The token's role may not do this"),
    (404, "No such resource"),
    (409, "Conflicts with the current state"),
    (
        413,
        "The body is larger than the endpoint's limit: 1 MiB, 8 MiB for a usage batch",
    ),
    (422, "Invalid fields, each listed in `errors` with its path"),
    (
        500,
        "The control plane failed; the body never carries internal details",
    ),
];

fn problems(statuses: &[u16]) -> BTreeMap<String, RefOr<Response>> {
    statuses
        .iter()
        .map(|status| {
            let description = PROBLEMS
                .iter()
                .find(|(s, _)| s == status)
                .map_or("Problem", |(_, d)| d);
            let response = ResponseBuilder::new()
                .description(description)
                .content(
                    PROBLEM_CONTENT_TYPE,
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

macro_rules! problem_set {
    ($(#[$doc:meta])* $name:ident: $($status:literal),+) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                problems(&[$($status),+])
            }
        }
    };
}

problem_set!(
    /// A listing: bad query, authentication, role, invalid `limit` or `cursor`.
    ListProblems: 400, 401, 403, 422, 500
);
problem_set!(
    /// Reading one resource.
    ReadProblems: 400, 401, 403, 404, 500
);
problem_set!(
    /// Creating a resource.
    CreateProblems: 400, 401, 403, 409, 413, 422, 500
);
problem_set!(
    /// Changing or acting on one resource.
    UpdateProblems: 400, 401, 403, 404, 409, 413, 422, 500
);
problem_set!(
    /// Deleting one resource.
    DeleteProblems: 400, 401, 403, 404, 409, 500
);
problem_set!(
    /// The gateway feed.
    FeedProblems: 400, 401, 403, 409, 422, 500
);
problem_set!(
    /// A gateway's usage batch.
    BatchProblems: 400, 401, 403, 413, 422, 500
);
problem_set!(
    /// A gateway's period sums: bad or invalid query, authentication, role.
    PeriodProblems: 400, 401, 403, 422, 500
);
problem_set!(
    /// A customer's usage view: also an unknown customer.
    UsageViewProblems: 400, 401, 403, 404, 422, 500
);

/// Completes the document from the router: every `POST` takes `Idempotency-Key`, as the
/// [`idempotency`](super::idempotency) middleware does for all of them but
/// [`NOT_REMEMBERED`](super::idempotency::NOT_REMEMBERED).
pub fn finish(mut openapi: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    for (path, item) in &mut openapi.paths.paths {
        if super::idempotency::NOT_REMEMBERED.contains(&path.as_str()) {
            continue;
        }
        if let Some(post) = item.post.as_mut() {
            post.parameters.get_or_insert_with(Vec::new).push(RefOr::T(
                ParameterBuilder::new()
                    .name("Idempotency-Key")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::False)
                    .description(Some(
                        "1 to 255 visible ASCII characters; a retry with the same key and request \
                         gets the first answer again, marked `Idempotent-Replayed: true`",
                    ))
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .min_length(Some(1))
                            .max_length(Some(255)),
                    ))
                    .build(),
            ));
        }
    }
    openapi
}
