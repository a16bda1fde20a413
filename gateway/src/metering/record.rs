//! One usage record as a line of the spool: tab-separated fields, written by the request path
//! straight from what it holds (no intermediate event, no JSON), and read back by the flusher
//! into a [`UsageEvent`].
//!
//! ```text
//! p  evt_…  1795000000123  cus_…  key_…  api  GET  200  1  0  0…0812  0…0  0…017  0195…-…
//! ```
//!
//! Fields, in order: kind (`p` pending, `e` final), event id, time (Unix ms), customer id, key id
//! (empty for a JWT caller), route, method, status, units, overage units, latency (µs), request
//! body bytes, response body bytes, request id. Latency and sizes are written zero-padded to 20
//! digits (any `u64`), so that the final record can be written over the pending one where it
//! lies ([`finish_in_place`]); lines of earlier versions, with shorter numbers, read the same.
//! Text fields are tokens by the time they get here
//! (validated route names and request ids, HTTP methods); a tab, line break or backslash in one
//! would still be escaped (`\t`, `\n`, `\r`, `\\`), so a line always has exactly 14 fields. A
//! line that does not have them, or whose numbers do not parse, is torn (a crash mid-write) and
//! is skipped by the reader.

use tollgate_model::usage::UsageEvent;

/// One record read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Written as the response header goes out: the request counts even if this process dies
    /// before it ends.
    Pending(Pending),
    /// Written when the request is over, with its final latency and sizes; replaces the pending
    /// record of the same id.
    Final(UsageEvent),
}

/// A pending record as read back: its event id, and its line, decoded only if no final record
/// settles it. Most requests end while their segment is open and their pending line becomes the
/// final one in place; one read back as pending was still running when its segment closed (its
/// final record is in a later segment) or was cut short by a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The event id.
    pub id: String,
    /// The whole line, without its newline.
    line: Vec<u8>,
}

impl Pending {
    /// The pending record of `event`.
    pub fn of(event: &UsageEvent) -> Self {
        let mut line = Vec::new();
        encode(Kind::Pending, &Usage::of(event), &mut line);
        line.pop();
        Self {
            id: event.id.clone(),
            line,
        }
    }

    /// Its event; `None` when the line holds none (torn).
    pub fn event(&self) -> Option<UsageEvent> {
        event(&fields(&self.line)?)
    }
}

/// Which record of a request a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// As the response header goes out.
    Pending,
    /// When the request is over.
    Final,
}

/// A usage event's fields, borrowed from wherever they are: what [`encode`] writes.
#[derive(Debug, Clone, Copy)]
pub struct Usage<'a> {
    /// `evt_…`.
    pub id: &'a str,
    /// The request's `X-Request-Id`.
    pub request_id: &'a str,
    /// `cus_…`.
    pub customer_id: &'a str,
    /// `key_…`, when the caller used a key.
    pub key_id: Option<&'a str>,
    /// The route's name.
    pub route: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The status the client received.
    pub status: u16,
    /// Microseconds from arrival to the last response byte.
    pub latency_us: u64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// Unix ms of arrival.
    pub at_ms: i64,
    /// Billable units.
    pub units: u64,
    /// Of them, overage units.
    pub overage: u64,
}

impl<'a> Usage<'a> {
    /// The fields of `event`.
    pub fn of(event: &'a UsageEvent) -> Self {
        Self {
            id: &event.id,
            request_id: &event.request_id,
            customer_id: &event.customer_id,
            key_id: event.key_id.as_deref(),
            route: &event.route,
            method: &event.method,
            status: event.status,
            latency_us: event.latency_us,
            bytes_in: event.bytes_in,
            bytes_out: event.bytes_out,
            at_ms: event.at_ms,
            units: event.units,
            overage: event.overage,
        }
    }
}

/// Fields of a line.
const FIELDS: usize = 14;

/// Digits of a latency or size field: enough for any `u64`, so a field's width never changes.
const MEASURE_DIGITS: usize = 20;

/// Where the fields a final record changes lie in a line [`encode`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measures {
    /// Offset of the latency field, the first of latency, bytes in and bytes out; each is
    /// [`MEASURE_DIGITS`] wide, with a tab between them.
    start: usize,
}

/// Appends `value` zero-padded to [`MEASURE_DIGITS`] digits.
fn push_measure(out: &mut Vec<u8>, value: u64) {
    let mut number = itoa::Buffer::new();
    let digits = number.format(value).as_bytes();
    out.resize(out.len() + MEASURE_DIGITS - digits.len(), b'0');
    out.extend_from_slice(digits);
}

/// Writes `value` right-aligned over `field` ([`MEASURE_DIGITS`] bytes), zeros before it.
fn write_measure(field: &mut [u8], value: u64) {
    let mut number = itoa::Buffer::new();
    let digits = number.format(value).as_bytes();
    let (zeros, tail) = field.split_at_mut(MEASURE_DIGITS - digits.len());
    zeros.fill(b'0');
    tail.copy_from_slice(digits);
}

/// Appends the line of `usage` (its newline included) to `out`; returns where its latency and
/// sizes lie in it, so that [`finish_in_place`] can make it the final record.
pub fn encode(kind: Kind, usage: &Usage<'_>, out: &mut Vec<u8>) -> Measures {
    let line_start = out.len();
    let mut numbers = itoa::Buffer::new();
    out.push(match kind {
        Kind::Pending => b'p',
        Kind::Final => b'e',
    });
    let text = |out: &mut Vec<u8>, value: &str| {
        out.push(b'\t');
        escape(value.as_bytes(), out);
    };
    text(out, usage.id);
    out.push(b'\t');
    out.extend_from_slice(numbers.format(usage.at_ms).as_bytes());
    text(out, usage.customer_id);
    text(out, usage.key_id.unwrap_or(""));
    text(out, usage.route);
    text(out, usage.method);
    for number in [u64::from(usage.status), usage.units, usage.overage] {
        out.push(b'\t');
        out.extend_from_slice(numbers.format(number).as_bytes());
    }
    let start = out.len() - line_start + 1;
    for number in [usage.latency_us, usage.bytes_in, usage.bytes_out] {
        out.push(b'\t');
        push_measure(out, number);
    }
    text(out, usage.request_id);
    out.push(b'\n');
    Measures { start }
}

/// Turns the pending `line` ([`encode`]d with `measures`) into its final record where it lies:
/// the request's final latency and sizes written over the pending ones, then the kind. Nothing
/// else of the line changes, and its length stays. The kind is written last: a process killed
/// midway leaves a pending record (digits only, so it still reads; its latency and sizes may mix
/// old and new digits, its units are whole), never a final one with numbers half written. That
/// order holds for a killed process, whose stores reach the page cache in program order; a
/// power loss before the next sync can keep any of the line's pages, so a line across a page
/// boundary may come back final with some pending digits, its units still whole.
pub fn finish_in_place(
    line: &mut [u8],
    measures: Measures,
    latency_us: u64,
    bytes_in: u64,
    bytes_out: u64,
) {
    let mut start = measures.start;
    for value in [latency_us, bytes_in, bytes_out] {
        write_measure(&mut line[start..start + MEASURE_DIGITS], value);
        start += MEASURE_DIGITS + 1;
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::Release);
    line[0] = b'e';
}

/// Bytes a field escapes: tab, line feed, carriage return and backslash.
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    table[b'\t' as usize] = true;
    table[b'\n' as usize] = true;
    table[b'\r' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

fn escape(value: &[u8], out: &mut Vec<u8>) {
    if !value.iter().any(|&b| ESCAPED[usize::from(b)]) {
        out.extend_from_slice(value);
        return;
    }
    for &byte in value {
        match byte {
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            other => out.push(other),
        }
    }
}

fn unescape(field: &[u8]) -> Option<String> {
    if !field.contains(&b'\\') {
        return String::from_utf8(field.to_vec()).ok();
    }
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.iter();
    while let Some(&byte) = bytes.next() {
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        out.push(match bytes.next()? {
            b't' => b'\t',
            b'n' => b'\n',
            b'r' => b'\r',
            b'\\' => b'\\',
            _ => return None,
        });
    }
    String::from_utf8(out).ok()
}

/// A field of decimal digits as a `T`; `None` for anything else, or a value `T` cannot hold.
/// Read straight from the bytes: six of a line's seven numbers (the time is [`signed`]), the
/// three measures 20 digits long.
fn number<T: TryFrom<u64>>(field: &[u8]) -> Option<T> {
    T::try_from(digits(field)?).ok()
}

/// A field of decimal digits, with a `-` before them for a negative value.
fn signed(field: &[u8]) -> Option<i64> {
    match field.split_first() {
        Some((b'-', magnitude)) => 0i64.checked_sub_unsigned(digits(magnitude)?),
        _ => i64::try_from(digits(field)?).ok(),
    }
}

fn digits(field: &[u8]) -> Option<u64> {
    if field.is_empty() {
        return None;
    }
    field.iter().try_fold(0u64, |value, &byte| {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The record of one line (without its newline); `None` for a torn or foreign line. A pending
/// line is only split here: its fields are read if it is ever needed ([`Pending::event`]).
pub fn decode(line: &[u8]) -> Option<Record> {
    // A record never holds a zero byte: one is a copy cut short by a crash (a copy need not
    // write its bytes in order) or a block a power loss left unwritten.
    if memchr::memchr(0, line).is_some() {
        return None;
    }
    let fields = fields(line)?;
    match fields[0] {
        b"p" => {
            let id = unescape(fields[1]).filter(|id| !id.is_empty())?;
            Some(Record::Pending(Pending {
                id,
                line: line.to_vec(),
            }))
        }
        b"e" => Some(Record::Final(event(&fields)?)),
        _ => None,
    }
}

/// The 14 fields of a line.
fn fields(line: &[u8]) -> Option<[&[u8]; FIELDS]> {
    let mut fields = [&[][..]; FIELDS];
    let mut tabs = memchr::memchr_iter(b'\t', line);
    let mut start = 0;
    for field in &mut fields[..FIELDS - 1] {
        let end = tabs.next()?;
        *field = &line[start..end];
        start = end + 1;
    }
    if tabs.next().is_some() {
        return None;
    }
    fields[FIELDS - 1] = &line[start..];
    Some(fields)
}

/// The event of a line's fields.
fn event(fields: &[&[u8]; FIELDS]) -> Option<UsageEvent> {
    let &[
        _,
        id,
        at_ms,
        customer_id,
        key_id,
        route,
        method,
        status,
        units,
        overage,
        latency_us,
        bytes_in,
        bytes_out,
        request_id,
    ] = fields;
    let event = UsageEvent {
        id: unescape(id)?,
        request_id: unescape(request_id)?,
        customer_id: unescape(customer_id)?,
        key_id: if key_id.is_empty() {
            None
        } else {
            Some(unescape(key_id)?)
        },
        route: unescape(route)?,
        method: unescape(method)?,
        status: number(status)?,
        latency_us: number(latency_us)?,
        bytes_in: number(bytes_in)?,
        bytes_out: number(bytes_out)?,
        at_ms: signed(at_ms)?,
        units: number(units)?,
        overage: number(overage)?,
    };
    // Every request has an id: a line without one is not a record.
    if event.id.is_empty() || event.customer_id.is_empty() || event.request_id.is_empty() {
        return None;
    }
    Some(event)
}

/// A record of a segment an earlier version wrote as JSON (`{"p":{…}}` or `{"e":{…}}`).
pub fn decode_legacy(line: &[u8]) -> Option<Record> {
    #[derive(serde::Deserialize)]
    enum Legacy {
        #[serde(rename = "p")]
        Pending(UsageEvent),
        #[serde(rename = "e")]
        Final(UsageEvent),
    }
    Some(match serde_json::from_slice(line).ok()? {
        Legacy::Pending(event) => Record::Pending(Pending::of(&event)),
        Legacy::Final(event) => Record::Final(event),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> UsageEvent {
        UsageEvent {
            id: format!("evt_{}", "0a".repeat(16)),
            request_id: "0195f3a2-7c1e-7000-8000-000000000001".into(),
            customer_id: format!("cus_{}", "01".repeat(16)),
            key_id: Some(format!("key_{}", "02".repeat(16))),
            route: "api".into(),
            method: "GET".into(),
            status: 200,
            latency_us: 812,
            bytes_in: 0,
            bytes_out: 17,
            at_ms: 1_795_000_000_123,
            units: 1,
            overage: 0,
        }
    }

    fn line(kind: Kind, event: &UsageEvent) -> Vec<u8> {
        let mut out = Vec::new();
        encode(kind, &Usage::of(event), &mut out);
        out
    }

    #[test]
    fn the_pending_line_finished_in_place_is_the_final_record_encoded() {
        let mut odd = event();
        odd.key_id = None;
        odd.request_id = "tab\there\\".into();
        for base in [event(), odd] {
            let mut pending = Vec::new();
            let measures = encode(Kind::Pending, &Usage::of(&base), &mut pending);
            for (latency_us, bytes_in, bytes_out) in [(0, 0, 0), (9, 1_000_000, u64::MAX)] {
                let mut done = base.clone();
                done.latency_us = latency_us;
                done.bytes_in = bytes_in;
                done.bytes_out = bytes_out;
                let mut finished = pending.clone();
                finish_in_place(&mut finished, measures, latency_us, bytes_in, bytes_out);
                assert_eq!(
                    String::from_utf8_lossy(&finished),
                    String::from_utf8_lossy(&line(Kind::Final, &done))
                );
                assert_eq!(
                    decode(&finished[..finished.len() - 1]),
                    Some(Record::Final(done))
                );
            }
        }
    }

    #[test]
    fn a_line_reads_back_as_the_event_it_was_written_from() {
        let event = event();
        let pending = line(Kind::Pending, &event);
        assert_eq!(
            String::from_utf8(pending.clone()).unwrap(),
            format!(
                "p\t{}\t1795000000123\t{}\t{}\tapi\tGET\t200\t1\t0\t{:020}\t{:020}\t{:020}\t{}\n",
                event.id,
                event.customer_id,
                event.key_id.as_deref().unwrap(),
                812,
                0,
                17,
                event.request_id
            )
        );
        let Some(Record::Pending(read)) = decode(pending.strip_suffix(b"\n").unwrap()) else {
            panic!("not a pending record");
        };
        assert_eq!(read.id, event.id);
        assert_eq!(read.event(), Some(event.clone()));
        assert_eq!(read, Pending::of(&event));
        let mut jwt = event.clone();
        jwt.key_id = None;
        jwt.units = u64::MAX;
        jwt.at_ms = -5;
        let last = line(Kind::Final, &jwt);
        assert_eq!(decode(&last[..last.len() - 1]), Some(Record::Final(jwt)));
        // Lines of earlier versions have their numbers as short as they are.
        let Some(Record::Final(short)) =
            decode(b"e\tevt_1\t1\tcus_1\t\tr\tGET\t200\t1\t0\t812\t0\t17\tid")
        else {
            panic!("a line with short numbers is a record");
        };
        assert_eq!(
            (short.latency_us, short.bytes_in, short.bytes_out),
            (812, 0, 17)
        );
    }

    #[test]
    fn numbers_are_digits_only_and_fit_their_type() {
        assert_eq!(number::<u64>(b"00000000000000000812"), Some(812));
        assert_eq!(number::<u64>(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(number::<u64>(b"18446744073709551616"), None);
        assert_eq!(number::<u16>(b"599"), Some(599));
        assert_eq!(number::<u16>(b"70000"), None);
        for junk in [
            &b""[..],
            b"+1",
            b"-1",
            b"1 ",
            b"1e3",
            b"0x10",
            "١".as_bytes(),
        ] {
            assert_eq!(number::<u64>(junk), None, "{junk:?}");
        }
        assert_eq!(signed(b"-5"), Some(-5));
        assert_eq!(signed(b"1795000000123"), Some(1_795_000_000_123));
        assert_eq!(signed(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(signed(b"9223372036854775808"), None);
        assert_eq!(signed(b"-"), None);
        assert_eq!(signed(b"--1"), None);
    }

    #[test]
    fn separators_inside_a_field_are_escaped() {
        let mut odd = event();
        odd.route = "a\tb\\c\nd\re".into();
        odd.method = "\\".into();
        let written = line(Kind::Final, &odd);
        assert_eq!(written.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(written.iter().filter(|&&b| b == b'\t').count(), FIELDS - 1);
        assert_eq!(
            decode(&written[..written.len() - 1]),
            Some(Record::Final(odd))
        );
    }

    #[test]
    fn torn_and_foreign_lines_are_refused() {
        for kind in [Kind::Pending, Kind::Final] {
            let full = line(kind, &event());
            let full = &full[..full.len() - 1];
            // Every prefix of a line is torn, except the line itself.
            for end in 0..full.len() {
                let cut = &full[..end];
                // A cut inside the last field still has 14 fields: the reader refuses it because
                // its newline is missing (`spool::read`).
                if cut.iter().filter(|&&b| b == b'\t').count() == FIELDS - 1 {
                    continue;
                }
                assert_eq!(decode(cut), None, "{}", String::from_utf8_lossy(cut));
            }
        }
        assert_eq!(
            decode(b"x\tevt_1\t1\tcus_1\t\tr\tGET\t200\t1\t0\t1\t0\t0\tid"),
            None
        );
        // A copy cut short out of order: zeros inside a line that has all its fields.
        let mut holed = line(Kind::Final, &event());
        holed.pop();
        let at = holed.len() - 5;
        holed[at..at + 3].fill(0);
        assert_eq!(decode(&holed), None);
        assert_eq!(
            decode(b"e\tevt_1\tnot\tcus_1\t\tr\tGET\t200\t1\t0\t1\t0\t0\tid"),
            None
        );
        // A pending line's numbers are read only when it is needed.
        let Some(Record::Pending(unreadable)) =
            decode(b"p\tevt_1\tnot\tcus_1\t\tr\tGET\t200\t1\t0\t1\t0\t0\tid")
        else {
            panic!("a pending line with 14 fields is kept");
        };
        assert_eq!(unreadable.id, "evt_1");
        assert_eq!(unreadable.event(), None);
        assert_eq!(
            decode(b"p\tevt_1\t1\tcus_1\t\tr\tGET\t200\t1\t0\t1\t0\t0\tid\textra"),
            None
        );
        assert_eq!(
            decode(b"e\tevt_1\t1\tcus_1\t\tr\tGET\t70000\t1\t0\t1\t0\t0\tid"),
            None
        );
        assert_eq!(
            decode(b"p\t\t1\tcus_1\t\tr\tGET\t200\t1\t0\t1\t0\t0\tid"),
            None
        );
        assert_eq!(decode(b"{\"p\":{}}"), None);
    }

    #[test]
    fn a_line_an_earlier_version_wrote_as_json_still_reads() {
        let event = event();
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            decode_legacy(format!("{{\"p\":{json}}}").as_bytes()),
            Some(Record::Pending(Pending::of(&event)))
        );
        assert_eq!(
            decode_legacy(format!("{{\"e\":{json}}}").as_bytes()),
            Some(Record::Final(event))
        );
        assert_eq!(decode_legacy(b"{\"e\":{\"id\":"), None);
    }
}
