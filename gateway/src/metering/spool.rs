//! The spool: usage records appended to files on local disk, one line each (see [`record`]),
//! before the response they describe goes out, so a crash of the process loses none.
//!
//! Records go to the active *segment* (`<seq>.tsv`, `seq` increasing); a segment is closed when
//! it is full ([`SEGMENT_BYTES`]) or when the flusher finds it older than its interval, and a
//! closed segment is read, sent and deleted by the flusher.
//!
//! **No system call per record.** A segment is created at its full size (`fallocate`, so its
//! blocks exist and writing into it cannot meet a full disk) and mapped into memory
//! (`MAP_SHARED`): an append is one copy of a whole line into the mapping, under a mutex. The
//! mapping's pages are the file's page cache, so what was copied survives `kill -9` exactly as a
//! `write(2)` would (a power loss is what the sync is for). A `write(2)` of a record to a file
//! took about 1.1 µs more than one to `/dev/null` on the development machine, twice per request;
//! an append is now about 90 instructions (callgrind, BENCHMARKS.md). A crash can cut only the last record,
//! mid-copy: the segment then ends in a part of a line followed by the zeros of the unwritten
//! rest, and a copy need not write its bytes in order, so the reader skips as torn any line
//! holding a zero byte.
//!
//! Closing a segment unmaps it and cuts the file to the records' length, so a closed segment is
//! lines only. The request path never closes one: when the active segment is full it starts the
//! next and leaves the full one to the flusher, whose [`Spool::tick`] closes it (and the active
//! one when due), then syncs the active one, once per tick and outside the lock: a power loss
//! costs at most one tick, and no request waits for a sync. (Once a segment, the request that
//! fills it creates the next, under the lock; and the first copy into a page after a sync takes
//! a page fault.) A disk with no room for a new segment stalls the spool: it then counts as
//! full, so metered requests are refused (503) rather than served without their usage, until
//! the flusher's tick can create one. A segment a killed process left mapped is cut to its
//! records when the spool is next opened. The total size on disk is bounded: once the records
//! not yet sent reach `max_bytes`, the request path refuses metered requests (503) rather than
//! serve them unmetered; the records of requests already admitted are still appended.
//!
//! The spool's directory belongs to one gateway process: a segment cut short by another process
//! while mapped would make the next copy into it fault.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tollgate_model::usage::UsageEvent;

#[cfg(test)]
use super::record::Pending;
use super::record::{self, Kind, Record, Usage};
pub use super::segment::SEGMENT_BYTES;
use super::segment::{EXTENSION, Mapped, cut_to_records, records_end};
/// Segments an earlier version wrote, one JSON object per line: still read, never written.
pub(crate) const LEGACY_EXTENSION: &str = "jsonl";

#[derive(Debug)]
struct Active {
    seq: u64,
    segment: Mapped,
    opened_ms: i64,
}

/// The active segment, and the full ones (by number) the request path left for the flusher to
/// close.
#[derive(Debug)]
struct Segments {
    active: Active,
    full: Vec<(u64, Mapped)>,
}

/// Where a record was appended: its segment and its offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    seq: u64,
    start: usize,
}

/// The spool directory and its active segment.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    segments: Mutex<Segments>,
    bytes: AtomicU64,
    /// Bytes of segments sent and kept only for requests still running.
    held: AtomicU64,
    max_bytes: u64,
    /// The active segment is full and the next could not be created (a full disk): records
    /// cannot be written, so the spool counts as full until a new segment is made.
    stalled: AtomicBool,
    /// The first segment of this process: older ones were left by an earlier one.
    first_own_seq: u64,
}

impl Spool {
    /// Opens the spool in `dir` (created if needed), counting what earlier processes left (a
    /// segment a killed process left mapped is cut to its records first), and starts a new
    /// segment after theirs.
    pub fn open(dir: &Path, max_bytes: u64, now_ms: i64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut bytes = 0;
        let mut last = 0;
        for (seq, path) in segments(dir)? {
            bytes += cut_to_records(&path)?;
            last = last.max(seq);
        }
        let seq = last + 1;
        Ok(Self {
            dir: dir.to_owned(),
            segments: Mutex::new(Segments {
                active: Active {
                    seq,
                    segment: Mapped::create(dir, seq)?,
                    opened_ms: now_ms,
                },
                full: Vec::new(),
            }),
            bytes: AtomicU64::new(bytes),
            held: AtomicU64::new(0),
            max_bytes,
            stalled: AtomicBool::new(false),
            first_own_seq: seq,
        })
    }

    /// Bytes on disk, every segment included.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The bound on [`bytes`](Self::bytes).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Whether new metered requests must be refused: the records not yet sent reach the bound
    /// (segments sent and kept only for long requests' final records do not count), or no
    /// record can be written at all (the disk has no room for a new segment).
    pub fn is_full(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
            || self
                .bytes()
                .saturating_sub(self.held.load(Ordering::Relaxed))
                >= self.max_bytes
    }

    /// Marks `bytes` of a sent segment as kept only for requests still running.
    pub fn hold(&self, bytes: u64) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Ends [`hold`](Self::hold) for a segment that is deleted.
    pub fn release(&self, bytes: u64) {
        subtract(&self.held, bytes);
    }

    /// The first segment this process wrote.
    pub fn first_own_seq(&self) -> u64 {
        self.first_own_seq
    }

    /// Appends one record: a whole line, its newline included ([`record::encode`]). Returns
    /// where it went, for [`rewrite`](Self::rewrite).
    pub fn append(&self, line: &[u8]) -> std::io::Result<Place> {
        if line.len() as u64 > SEGMENT_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a usage record of {} bytes is longer than a segment",
                    line.len()
                ),
            ));
        }
        // Held for one copy of one line, and once a segment (4 MiB of records) for creating the
        // next one; otherwise only `rewrite` (one line compared and rewritten) and `tick` (taking
        // the full segments out) take it.
        let mut segments = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        let start = match segments.active.segment.push(line) {
            Some(start) => start,
            None => {
                let opened_ms = segments.active.opened_ms;
                if let Err(error) = self.rotate(&mut segments, opened_ms) {
                    self.stalled.store(true, Ordering::Relaxed);
                    return Err(error);
                }
                // A line no longer than a segment fits a new one.
                segments.active.segment.push(line).ok_or_else(|| {
                    std::io::Error::other("a usage record does not fit a new segment")
                })?
            }
        };
        self.bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
        Ok(Place {
            seq: segments.active.seq,
            start,
        })
    }

    /// Changes the record `line` appended at `place` with `change`, where it lies, if its
    /// segment is still mapped (active, or full and not yet closed by [`tick`](Self::tick)) and
    /// holds that line there; `false` otherwise, and nothing changed. `change` keeps the line's
    /// length. A closed segment is never changed: the flusher may be reading it.
    pub fn rewrite(&self, place: Place, line: &[u8], change: impl FnOnce(&mut [u8])) -> bool {
        let mut segments = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
        let Segments { active, full } = &mut *segments;
        let segment = if active.seq == place.seq {
            Some(&mut active.segment)
        } else {
            full.iter_mut()
                .find(|(seq, _)| *seq == place.seq)
                .map(|(_, segment)| segment)
        };
        let Some(record) = segment.and_then(|s| s.record_mut(place.start, line.len())) else {
            return false;
        };
        if record != line {
            return false;
        }
        change(record);
        true
    }

    /// Starts the next segment; the closed one waits in `full` for the flusher's next tick. If
    /// the next one cannot be created, the active one stays.
    fn rotate(&self, segments: &mut Segments, now_ms: i64) -> std::io::Result<()> {
        let seq = segments.active.seq + 1;
        let next = Mapped::create(&self.dir, seq)?;
        let old = std::mem::replace(
            &mut segments.active,
            Active {
                seq,
                segment: next,
                opened_ms: now_ms,
            },
        );
        segments.full.push((old.seq, old.segment));
        self.stalled.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the full segments, and the active one too if it has records and was opened at
    /// least `age_ms` before `now_ms` (or the spool is stalled); then syncs the active one.
    /// Returns the first segment not closed: every segment before it is closed and can be read.
    /// A segment that cannot be closed is tried again at the next tick; a new segment that
    /// cannot be created is logged, and the active one stays. Closing and syncing run after the
    /// lock is released.
    pub fn tick(&self, now_ms: i64, age_ms: i64) -> std::io::Result<u64> {
        let (active_seq, full, active) = {
            let mut segments = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
            let due =
                !segments.active.segment.is_empty() && now_ms - segments.active.opened_ms >= age_ms;
            if (due || self.stalled.load(Ordering::Relaxed))
                && let Err(error) = self.rotate(&mut segments, now_ms)
            {
                tracing::error!(%error, "cannot start a new usage spool segment");
            }
            let full = std::mem::take(&mut segments.full);
            (
                segments.active.seq,
                full,
                segments.active.segment.sync_handle()?,
            )
        };
        let mut first_open = active_seq;
        let mut open = Vec::new();
        for (seq, mut segment) in full {
            if let Err(error) = segment.close() {
                tracing::error!(%error, seq, "cannot close a usage spool segment; trying again");
                first_open = first_open.min(seq);
                open.push((seq, segment));
            }
        }
        if !open.is_empty() {
            let mut segments = self.segments.lock().unwrap_or_else(PoisonError::into_inner);
            open.append(&mut segments.full);
            segments.full = open;
        }
        active.sync_data()?;
        Ok(first_open)
    }

    /// Closed segments, oldest first: those before `active`.
    pub fn closed(&self, active: u64) -> std::io::Result<Vec<(u64, PathBuf)>> {
        Ok(segments(&self.dir)?
            .into_iter()
            .filter(|(seq, _)| *seq < active)
            .collect())
    }

    /// Keeps events the ledger refused for good in `rejected/` of the spool directory (outside
    /// the spool's count), for an operator to look at and `gateway --replay-rejected` to send
    /// again; returns the file. Named by the first event's id, with `.1`, `.2`… when that name is
    /// taken: a file set aside is never replaced. It appears whole or not at all: written and
    /// synced under a temporary name first, then linked to its name (which fails rather than
    /// replace a file).
    pub fn set_aside(&self, events: &[UsageEvent]) -> std::io::Result<PathBuf> {
        let dir = self.dir.join("rejected");
        std::fs::create_dir_all(&dir)?;
        let first = events.first().map_or("empty", |e| e.id.as_str());
        let temporary = dir.join(format!(".{first}.{}.partial", std::process::id()));
        write_finals(&temporary, events)?;
        let mut copy = 0u32;
        let path = loop {
            let path = match copy {
                0 => dir.join(format!("{first}.{EXTENSION}")),
                n => dir.join(format!("{first}.{n}.{EXTENSION}")),
            };
            match std::fs::hard_link(&temporary, &path) {
                Ok(()) => break path,
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => copy += 1,
                Err(error) => {
                    let _ = std::fs::remove_file(&temporary);
                    return Err(error);
                }
            }
        };
        std::fs::remove_file(&temporary)?;
        File::open(&dir)?.sync_all()?;
        Ok(path)
    }

    /// Deletes a closed segment that was sent.
    pub fn remove(&self, path: &Path) -> std::io::Result<()> {
        let size = std::fs::metadata(path)?.len();
        std::fs::remove_file(path)?;
        subtract(&self.bytes, size);
        Ok(())
    }
}

/// Writes the final records of `events` to a new file at `path`, synced: a set-aside file's
/// content, before it takes its name.
pub(crate) fn write_finals(path: &Path, events: &[UsageEvent]) -> std::io::Result<()> {
    let mut lines = Vec::new();
    for event in events {
        record::encode(Kind::Final, &Usage::of(event), &mut lines);
    }
    let mut file = File::create(path)?;
    file.write_all(&lines)?;
    file.sync_all()
}

/// Takes `amount` from `counter`, stopping at zero: a count that went wrong must not wrap and
/// read as a full spool.
fn subtract(counter: &AtomicU64, amount: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| {
        Some(value.saturating_sub(amount))
    });
}

/// Segments in `dir`, by number.
fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| {
                n.strip_suffix(EXTENSION)
                    .or_else(|| n.strip_suffix(LEGACY_EXTENSION))?
                    .strip_suffix('.')
            })
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            found.push((seq, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The records of a segment, synced to disk first. A line that does not parse, or the last one
/// when it lacks its newline (torn by a crash or a full disk mid-write: only the last line of a
/// segment can be), is skipped and counted.
pub fn read(path: &Path) -> std::io::Result<(Vec<Record>, usize)> {
    File::open(path)?.sync_data()?;
    let mut text = std::fs::read(path)?;
    // A segment still mapped when its process was killed: records, then zeros.
    text.truncate(records_end(&text));
    let mut records = Vec::new();
    let mut torn = 0;
    let (whole, fragment) = match memchr::memrchr(b'\n', &text) {
        Some(end) => (&text[..end], &text[end + 1..]),
        None => (&[][..], &text[..]),
    };
    if !fragment.is_empty() {
        torn += 1;
    }
    let legacy = path.extension().is_some_and(|e| e == LEGACY_EXTENSION);
    records.reserve(memchr::memchr_iter(b'\n', whole).count() + 1);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', whole).chain([whole.len()]) {
        let line = &whole[start..end];
        start = end + 1;
        if line.is_empty() {
            continue;
        }
        let decoded = if legacy {
            record::decode_legacy(line)
        } else {
            record::decode(line)
        };
        match decoded {
            Some(record) => records.push(record),
            None => torn += 1,
        }
    }
    Ok((records, torn))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A final event numbered `id` of customer `cus_0101…`, counting `units`.
    pub(crate) fn event(id: u8, units: u64) -> UsageEvent {
        UsageEvent {
            id: format!("evt_{}", hex::encode([id; 16])),
            request_id: "r".into(),
            customer_id: format!("cus_{}", hex::encode([1; 16])),
            key_id: None,
            route: "api".into(),
            method: "GET".into(),
            status: 200,
            latency_us: 10,
            bytes_in: 0,
            bytes_out: 5,
            at_ms: 1,
            units,
            overage: 0,
        }
    }

    fn line(kind: Kind, event: &UsageEvent) -> Vec<u8> {
        let mut line = Vec::new();
        record::encode(kind, &Usage::of(event), &mut line);
        line
    }

    #[test]
    fn events_set_aside_under_a_name_already_taken_keep_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        let first = spool.set_aside(&[event(1, 1), event(2, 1)]).unwrap();
        let second = spool.set_aside(&[event(1, 1)]).unwrap();
        assert_ne!(first, second);
        assert_eq!(std::fs::read_to_string(&first).unwrap().lines().count(), 2);
        assert_eq!(std::fs::read_to_string(&second).unwrap().lines().count(), 1);
    }

    #[test]
    fn records_survive_a_restart_and_a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        spool.append(&line(Kind::Pending, &event(1, 1))).unwrap();
        spool.append(&line(Kind::Final, &event(1, 1))).unwrap();
        let (seq, path) = segments(dir.path()).unwrap().remove(0);
        assert_eq!(seq, 1);
        // Dropped (a clean stop): the segment is cut to its records.
        drop(spool);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size > 0 && size < SEGMENT_BYTES);
        // A crash mid-write of an earlier version, which wrote with `write(2)`, leaves a line
        // without its end (here: all of its fields, the last one cut short).
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let whole = line(Kind::Pending, &event(2, 1));
        file.write_all(&whole[..whole.len() - 3]).unwrap();
        let reopened = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(reopened.first_own_seq(), 2);
        assert!(reopened.bytes() > 0);
        let closed = reopened.closed(reopened.first_own_seq()).unwrap();
        assert_eq!(closed.len(), 1);
        let (records, torn) = read(&closed[0].1).unwrap();
        assert_eq!(
            records,
            [
                Record::Pending(Pending::of(&event(1, 1))),
                Record::Final(event(1, 1))
            ]
        );
        assert_eq!(torn, 1);
    }

    #[test]
    fn a_spool_killed_while_mapped_keeps_its_records_and_a_record_cut_mid_copy_is_skipped() {
        let first = line(Kind::Pending, &event(1, 1));
        let whole = line(Kind::Final, &event(3, 1));
        // A process killed with its segment mapped: nothing unmapped or cut, the records in the
        // page cache, the rest of the segment zeros.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        spool.append(&first).unwrap();
        spool.append(&whole).unwrap();
        std::mem::forget(spool);
        let path = &segments(dir.path()).unwrap()[0].1;
        assert_eq!(std::fs::metadata(path).unwrap().len(), SEGMENT_BYTES);
        let reopened = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        let size = (first.len() + whole.len()) as u64;
        assert_eq!(reopened.bytes(), size, "cut to its records");
        assert_eq!(std::fs::metadata(path).unwrap().len(), size);
        let (records, torn) = read(path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(torn, 0);

        // Killed mid-copy: any part of the last line, then zeros.
        for cut in 0..whole.len() {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = first.clone();
            bytes.extend_from_slice(&whole[..cut]);
            bytes.resize(bytes.len() + 4096, 0);
            let path = dir.path().join(format!("{:016}.{EXTENSION}", 1));
            std::fs::write(&path, &bytes).unwrap();
            let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
            assert_eq!(spool.bytes(), (first.len() + cut) as u64);
            let (records, torn) = read(&path).unwrap();
            assert_eq!(
                records,
                [Record::Pending(Pending::of(&event(1, 1)))],
                "cut at {cut}"
            );
            assert_eq!(torn, usize::from(cut > 0), "cut at {cut}");
        }
    }

    #[test]
    fn a_full_segment_is_closed_by_the_next_tick_with_every_record_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), u64::MAX, 0).unwrap();
        // Records of one length, numbered by their units.
        let record = |n: u64| line(Kind::Final, &event(1, 1_000_000 + n));
        let size = record(0).len();
        let per_segment = SEGMENT_BYTES as usize / size;
        let count = per_segment as u64 + 10;
        for n in 0..count {
            spool.append(&record(n)).unwrap();
        }
        // The full segment waits for the flusher: the request path only started the next.
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
        let active = spool.tick(0, i64::MAX).unwrap();
        assert_eq!(active, 2, "the second segment is not due yet");
        let closed = spool.closed(active).unwrap();
        assert_eq!(closed.len(), 1);
        let on_disk = std::fs::metadata(&closed[0].1).unwrap().len();
        assert_eq!(on_disk, (per_segment * size) as u64, "cut to its records");
        let active = spool.tick(1, 0).unwrap();
        let closed = spool.closed(active).unwrap();
        let mut units = Vec::new();
        for (_, path) in &closed {
            let (records, torn) = read(path).unwrap();
            assert_eq!(torn, 0);
            units.extend(records.into_iter().map(|record| match record {
                Record::Final(event) => event.units - 1_000_000,
                Record::Pending(_) => unreachable!("only final records were written"),
            }));
        }
        assert_eq!(units, (0..count).collect::<Vec<_>>());
        assert_eq!(spool.bytes(), count * size as u64);
    }

    #[test]
    fn a_disk_without_room_for_the_next_segment_stalls_the_spool_until_a_tick_makes_one() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), u64::MAX, 0).unwrap();
        let record = line(Kind::Final, &event(1, 1));
        let per_segment = SEGMENT_BYTES as usize / record.len();
        for _ in 0..per_segment {
            spool.append(&record).unwrap();
        }
        assert!(!spool.is_full());
        // The next segment cannot be created (here its name is taken, as a full disk would
        // refuse its blocks): the record is refused, and so are new metered requests.
        let blocker = dir.path().join(format!("{:016}.{EXTENSION}", 2));
        std::fs::create_dir(&blocker).unwrap();
        assert!(spool.append(&record).is_err());
        assert!(spool.is_full(), "stalled: counts as full");
        assert_eq!(spool.bytes(), (per_segment * record.len()) as u64);
        // A tick that cannot make one either still syncs and reports the active segment.
        assert_eq!(spool.tick(0, i64::MAX).unwrap(), 1);
        assert!(spool.is_full());
        std::fs::remove_dir(&blocker).unwrap();
        assert_eq!(
            spool.tick(0, i64::MAX).unwrap(),
            2,
            "a new segment, the full one closed"
        );
        assert!(!spool.is_full());
        spool.append(&record).unwrap();
        let (records, torn) = read(&spool.closed(2).unwrap()[0].1).unwrap();
        assert_eq!((records.len(), torn), (per_segment, 0));
    }

    #[test]
    fn segments_an_earlier_version_wrote_as_json_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let json = serde_json::to_string(&event(1, 1)).unwrap();
        std::fs::write(
            dir.path().join("0000000000000007.jsonl"),
            format!("{{\"p\":{json}}}\n{{\"e\":{json}}}\n"),
        )
        .unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(spool.first_own_seq(), 8);
        let closed = spool.closed(spool.first_own_seq()).unwrap();
        assert_eq!(closed.len(), 1);
        let (records, torn) = read(&closed[0].1).unwrap();
        assert_eq!(
            records,
            [
                Record::Pending(Pending::of(&event(1, 1))),
                Record::Final(event(1, 1))
            ]
        );
        assert_eq!(torn, 0);
    }

    #[test]
    fn the_spool_is_full_at_its_bound_until_sent_segments_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let size = line(Kind::Final, &event(1, 1)).len() as u64;
        let spool = Spool::open(dir.path(), size * 2, 0).unwrap();
        spool.append(&line(Kind::Final, &event(1, 1))).unwrap();
        assert!(!spool.is_full());
        spool.append(&line(Kind::Final, &event(2, 1))).unwrap();
        assert!(spool.is_full());
        assert_eq!(spool.bytes(), size * 2);
        // Sent and kept only for a running request's final record: not counted.
        spool.hold(size);
        assert!(!spool.is_full());
        spool.release(size);
        assert!(spool.is_full());
        let active = spool.tick(10, 0).unwrap();
        for (_, path) in spool.closed(active).unwrap() {
            spool.remove(&path).unwrap();
        }
        assert_eq!(spool.bytes(), 0);
        assert!(!spool.is_full());
    }

    #[test]
    fn tick_closes_a_segment_only_once_it_is_old_enough_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(spool.tick(5_000, 1_000).unwrap(), 1, "empty: kept");
        spool.append(&line(Kind::Final, &event(1, 1))).unwrap();
        assert_eq!(spool.tick(500, 1_000).unwrap(), 1, "young: kept");
        assert_eq!(spool.tick(1_000, 1_000).unwrap(), 2);
        assert_eq!(spool.closed(2).unwrap().len(), 1);
    }
}
