//! Every answer of the API tests is checked against the OpenAPI document the control plane
//! serves: the operation exists, the status is documented for it, the content type is the
//! documented one, and the body matches the documented schema (required members present, no
//! undocumented member, types and enumerations as declared). So the document cannot drift from
//! what the handlers answer without a test failing.

use std::sync::OnceLock;

use serde_json::Value;

fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        serde_json::to_value(tollgate_control_plane::api::openapi_document())
            .expect("the document serializes")
    })
}

/// The documented path template that `path` (without its query) falls under.
pub fn template(path: &str) -> Option<&'static str> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    document()["paths"]
        .as_object()?
        .keys()
        .find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(part, segment)| {
                    part == segment || (part.starts_with('{') && !segment.is_empty())
                })
        })
        .map(String::as_str)
}

/// Panics, saying why, when the answer is not what the document promises.
pub fn check(method: &str, path: &str, status: u16, content_type: Option<&str>, body: &Value) {
    let doc = document();
    let Some(template) = template(path) else {
        // Paths outside the API answer the not-found problem.
        assert_eq!(
            status, 404,
            "{method} {path}: undocumented path answered {status}"
        );
        assert_eq!(content_type, Some("application/problem+json"));
        return;
    };
    let operation = &doc["paths"][template][method.to_ascii_lowercase()];
    if operation.is_null() {
        assert_eq!(
            status, 405,
            "{method} {template}: undocumented method answered {status}"
        );
        return;
    }
    let response = &operation["responses"][status.to_string()];
    assert!(
        !response.is_null(),
        "{method} {template}: status {status} is not documented; body {body}"
    );
    let Some(content) = response["content"].as_object() else {
        assert!(
            body.is_null(),
            "{method} {template} {status}: documented without a body, answered {body}"
        );
        return;
    };
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .unwrap_or_default();
    let Some(media) = content.get(content_type) else {
        panic!(
            "{method} {template} {status}: content type {content_type:?} is not documented ({:?})",
            content.keys().collect::<Vec<_>>()
        );
    };
    if let Err(error) = validate(&media["schema"], body, "$") {
        panic!(
            "{method} {template} {status}: body does not match its schema: {error}\nbody: {body}"
        );
    }
}

fn resolve(schema: &Value) -> &Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            resolve(&document()["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// Property names a schema documents, through references and compositions.
fn property_names(schema: &Value, names: &mut Vec<String>) {
    let schema = resolve(schema);
    if let Some(properties) = schema["properties"].as_object() {
        names.extend(properties.keys().cloned());
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for branch in schema[key].as_array().into_iter().flatten() {
            property_names(branch, names);
        }
    }
}

fn validate(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    validate_with(schema, value, at, true)
}

fn validate_with(schema: &Value, value: &Value, at: &str, closed: bool) -> Result<(), String> {
    let schema = resolve(schema);
    if let Some(branches) = schema["allOf"].as_array() {
        for branch in branches {
            validate_with(branch, value, at, false)?;
        }
        if closed && let Some(object) = value.as_object() {
            let mut names = Vec::new();
            property_names(schema, &mut names);
            if let Some(extra) = object.keys().find(|k| !names.contains(k)) {
                return Err(format!("{at}.{extra} is not documented"));
            }
        }
    }
    if let Some(branches) = schema["oneOf"].as_array() {
        let errors: Vec<String> = branches
            .iter()
            .filter_map(|branch| validate_with(branch, value, at, closed).err())
            .collect();
        if errors.len() == branches.len() {
            return Err(format!(
                "{at} matches no alternative: {}",
                errors.join("; ")
            ));
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Err(format!("{at} = {value} is not one of {allowed:?}"));
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !types.iter().any(|t| is_type(value, t)) {
        return Err(format!("{at} = {value} is not of type {types:?}"));
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                return Err(format!("{at}.{name} is required but missing"));
            }
        }
        if let Some(properties) = schema["properties"].as_object() {
            for (name, member) in object {
                match properties.get(name) {
                    Some(property) => validate(property, member, &format!("{at}.{name}"))?,
                    None if closed => return Err(format!("{at}.{name} is not documented")),
                    None => {}
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn is_type(value: &Value, kind: &str) -> bool {
    match kind {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    }
}
