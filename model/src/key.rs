//! API key format: `tg_`, 22 base62 characters of randomness (128 bits), and 6 base62 characters
//! of CRC-32 over them.
//!
//! The fixed prefix makes a leaked key recognisable (secret scanners can match it); the checksum
//! lets both planes refuse a mistyped or made-up key without any lookup. Only a SHA-256 of the
//! whole key is ever stored.

/// Every key starts with this.
pub const KEY_PREFIX: &str = "tg_";
const RANDOM_LEN: usize = 22;
const CHECKSUM_LEN: usize = 6;
/// Length of a whole key.
pub const KEY_LEN: usize = KEY_PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
/// Characters of a key shown in listings.
pub const DISPLAY_LEN: usize = KEY_PREFIX.len() + 6;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Builds a key from 16 random bytes.
pub fn from_random(random: [u8; 16]) -> String {
    let body = base62(u128::from_be_bytes(random), RANDOM_LEN);
    let checksum = base62(u128::from(crc32(body.as_bytes())), CHECKSUM_LEN);
    format!("{KEY_PREFIX}{body}{checksum}")
}

/// Whether `key` has the prefix, length, alphabet and checksum of a key. This runs on every
/// authenticated request: no allocation, and the checksum's digits are read as a number to
/// compare with the CRC, not written out from it.
pub fn is_well_formed(key: &str) -> bool {
    let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
        return false;
    };
    if rest.len() != RANDOM_LEN + CHECKSUM_LEN {
        return false;
    }
    let (body, checksum) = rest.as_bytes().split_at(RANDOM_LEN);
    if !body.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    // Six base62 digits, most significant first, name one number below 62^6 (more than 2^32):
    // the same number as the CRC's only when they are its digits.
    let mut written = 0u64;
    for &byte in checksum {
        let Some(digit) = digit_value(byte) else {
            return false;
        };
        written = written * 62 + u64::from(digit);
    }
    written == u64::from(crc32(body))
}

/// The value of `byte` as a base62 digit of [`ALPHABET`].
fn digit_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'A'..=b'Z' => Some(byte - b'A' + 10),
        b'a'..=b'z' => Some(byte - b'a' + 36),
        _ => None,
    }
}

/// The start of a key shown in listings.
pub fn display_start(key: &str) -> String {
    key.chars().take(DISPLAY_LEN).collect()
}

fn base62(mut value: u128, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(digits).unwrap_or_default()
}

/// CRC-32 (IEEE 802.3).
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn the_checksum_check_agrees_with_how_keys_are_made() {
        for seed in 0..200u8 {
            let key = from_random([seed; 16]);
            let body = &key[KEY_PREFIX.len()..KEY_PREFIX.len() + RANDOM_LEN];
            assert_eq!(
                key[KEY_PREFIX.len() + RANDOM_LEN..],
                base62(u128::from(crc32(body.as_bytes())), CHECKSUM_LEN)
            );
            assert!(is_well_formed(&key));
        }
        for (value, &digit) in ALPHABET.iter().enumerate() {
            assert_eq!(digit_value(digit), u8::try_from(value).ok());
        }
        for byte in (0..=u8::MAX).filter(|b| !b.is_ascii_alphanumeric()) {
            assert_eq!(digit_value(byte), None, "{byte}");
        }
    }

    #[test]
    fn keys_issued_before_stay_well_formed() {
        // Made by an independent CRC-32 (Python's zlib) and base62 from the same 16 bytes.
        assert_eq!(from_random([7; 16]), "tg_0DG9mkOv2l6AkSp3WsPxY72c0WNP");
        assert!(is_well_formed("tg_0DG9mkOv2l6AkSp3WsPxY72c0WNP"));
        // The largest checksum six digits can write is past any CRC: never taken.
        assert!(!is_well_formed("tg_0DG9mkOv2l6AkSp3WsPxY7zzzzzz"));
    }

    #[test]
    fn keys_have_the_prefix_length_and_a_valid_checksum() {
        let key = from_random([7; 16]);
        assert!(key.starts_with("tg_"));
        assert_eq!(key.len(), KEY_LEN);
        assert!(is_well_formed(&key));
        assert_eq!(display_start(&key), key[..9]);
        assert_ne!(from_random([8; 16]), key);
    }

    #[test]
    fn any_changed_character_breaks_the_checksum() {
        let key = from_random([42; 16]);
        for i in KEY_PREFIX.len()..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).unwrap();
            assert!(!is_well_formed(&changed), "{changed}");
        }
    }

    #[test]
    fn refuses_junk() {
        for junk in [
            "",
            "tg_",
            "tg_short",
            "sk_live_0123456789012345678901234567",
            &"tg_".repeat(11),
        ] {
            assert!(!is_well_formed(junk), "{junk}");
        }
    }
}
