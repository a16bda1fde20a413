//! `X-Request-Id`: keep a valid incoming one, otherwise make one.

/// The header name.
pub const HEADER: &str = "x-request-id";

/// Longest incoming id kept.
const MAX_LEN: usize = 128;

/// Whether an incoming id is kept: 1 to 128 characters of `A-Z a-z 0-9 - _ . : / + =`. Anything
/// else (spaces, quotes, control bytes, oversized values) is replaced so it cannot smuggle
/// content into logs or upstream headers.
pub fn is_valid(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id.iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=')
        })
}

/// A new id: a UUIDv7, so ids sort by time in logs.
pub fn generate() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

/// The incoming id if valid, else a new one.
pub fn from_header(value: Option<&[u8]>) -> String {
    match value {
        Some(id) if is_valid(id) => String::from_utf8_lossy(id).into_owned(),
        _ => generate(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_valid_ids() {
        assert_eq!(from_header(Some(b"abc-123_x.y:z/+=")), "abc-123_x.y:z/+=");
        let long = "a".repeat(128);
        assert_eq!(from_header(Some(long.as_bytes())), long);
    }

    #[test]
    fn replaces_invalid_ids() {
        for bad in [
            &b""[..],
            b"has space",
            b"quote\"",
            b"new\nline",
            &[b'a'; 129][..],
            "é".as_bytes(),
        ] {
            let id = from_header(Some(bad));
            assert_ne!(id.as_bytes(), bad);
            assert!(is_valid(id.as_bytes()));
            assert_eq!(id.len(), 36);
        }
    }

    #[test]
    fn generates_distinct_uuids() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(uuid::Uuid::parse_str(&a).is_ok());
    }
}
