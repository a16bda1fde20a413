//! The spool: usage records appended to files on local disk, one line each (see [`record`]),
//! before the response they describe goes out, so a crash of the process loses none.
//!
//! Records go to the active *segment* (`<seq>.tsv`, `seq` increasing); a segment is closed when
//! it passes [`SEGMENT_BYTES`] or when the flusher finds it older than its interval, and a closed
//! segment is read, sent and deleted by the flusher. Each append is one `write(2)` of a whole line
//! under a mutex (no buffer in this process: what was written survives `kill -9`); after a write
//! that failed (a full disk), the next record starts with two tabs and a line break: whatever part
//! of a line the failed write left becomes a line of its own that can never read as a record (two
//! more fields, or an empty request id), so it is skipped as torn and hides no other record; its
//! bytes are counted.
//! The flusher `fsync`s the active segment every tick, so a power loss costs at most one tick. The total size
//! on disk is bounded: once the records not yet sent reach `max_bytes`, the request path refuses
//! metered requests (503) rather than serve them unmetered; the records of requests already
//! admitted are still appended.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tollgate_model::usage::UsageEvent;

#[cfg(test)]
use super::record::Pending;
use super::record::{self, Kind, Record, Usage};

/// The file extension of a segment: tab-separated values.
const EXTENSION: &str = "tsv";
/// Segments an earlier version wrote, one JSON object per line: still read, never written.
const LEGACY_EXTENSION: &str = "jsonl";

/// What ends the fragment a failed write may have left, before the next record.
const FRAGMENT_END: &[u8] = b"\t\t\n";

/// Size past which the active segment is closed.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug)]
struct Active {
    seq: u64,
    file: File,
    bytes: u64,
    records: u64,
    opened_ms: i64,
    /// A write failed part-way: the segment ends inside a line.
    fragment: bool,
}

/// The spool directory and its active segment.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    active: Mutex<Active>,
    bytes: AtomicU64,
    /// Bytes of segments sent and kept only for requests still running.
    held: AtomicU64,
    max_bytes: u64,
    /// The first segment of this process: older ones were left by an earlier one.
    first_own_seq: u64,
}

impl Spool {
    /// Opens the spool in `dir` (created if needed), counting what earlier processes left, and
    /// starts a new segment after theirs.
    pub fn open(dir: &Path, max_bytes: u64, now_ms: i64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut bytes = 0;
        let mut last = 0;
        for (seq, path) in segments(dir)? {
            bytes += std::fs::metadata(&path)?.len();
            last = last.max(seq);
        }
        let seq = last + 1;
        Ok(Self {
            dir: dir.to_owned(),
            active: Mutex::new(Active {
                seq,
                file: create(dir, seq)?,
                bytes: 0,
                records: 0,
                opened_ms: now_ms,
                fragment: false,
            }),
            bytes: AtomicU64::new(bytes),
            held: AtomicU64::new(0),
            max_bytes,
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
    /// (segments sent and kept only for long requests' final records do not count).
    pub fn is_full(&self) -> bool {
        self.bytes()
            .saturating_sub(self.held.load(Ordering::Relaxed))
            >= self.max_bytes
    }

    /// Marks `bytes` of a sent segment as kept only for requests still running.
    pub fn hold(&self, bytes: u64) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Ends [`hold`](Self::hold) for a segment that is deleted.
    pub fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The first segment this process wrote.
    pub fn first_own_seq(&self) -> u64 {
        self.first_own_seq
    }

    /// Appends one record: a whole line, its newline included ([`record::encode`]).
    pub fn append(&self, line: &[u8]) -> std::io::Result<()> {
        // Held for one write of one line; nothing else happens under it.
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        let written = if active.fragment {
            let mut after_fragment = Vec::with_capacity(line.len() + 3);
            after_fragment.extend_from_slice(FRAGMENT_END);
            after_fragment.extend_from_slice(line);
            active
                .file
                .write_all(&after_fragment)
                .map(|()| after_fragment.len())
        } else {
            active.file.write_all(line).map(|()| line.len())
        };
        let written = match written {
            Ok(written) => written as u64,
            Err(error) => {
                // Part of it may be on disk: count what is, and end it before the next record.
                if let Ok(size) = active.file.metadata().map(|m| m.len())
                    && size > active.bytes
                {
                    self.bytes.fetch_add(size - active.bytes, Ordering::Relaxed);
                    active.bytes = size;
                }
                active.fragment = true;
                return Err(error);
            }
        };
        active.fragment = false;
        active.bytes += written;
        active.records += 1;
        self.bytes.fetch_add(written, Ordering::Relaxed);
        if active.bytes >= SEGMENT_BYTES {
            let opened_ms = active.opened_ms;
            // Closed without a sync, so no request waits for the disk: the flusher syncs every
            // closed segment as it first reads it.
            drop(self.rotate(&mut active, opened_ms)?);
        }
        Ok(())
    }

    /// Starts the next segment; returns the closed one's file, to sync once the lock is released.
    fn rotate(&self, active: &mut Active, now_ms: i64) -> std::io::Result<File> {
        let seq = active.seq + 1;
        let file = create(&self.dir, seq)?;
        let old = std::mem::replace(
            active,
            Active {
                seq,
                file,
                bytes: 0,
                records: 0,
                opened_ms: now_ms,
                fragment: false,
            },
        );
        Ok(old.file)
    }

    /// Syncs the active segment to disk, and closes it if it has records and was opened at least
    /// `age_ms` before `now_ms`. Returns the active segment's number. The sync runs after the lock
    /// is released: requests never wait for the disk.
    pub fn tick(&self, now_ms: i64, age_ms: i64) -> std::io::Result<u64> {
        let (seq, file) = {
            let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
            let file = if active.records > 0 && now_ms - active.opened_ms >= age_ms {
                self.rotate(&mut active, now_ms)?
            } else {
                active.file.try_clone()?
            };
            (active.seq, file)
        };
        file.sync_data()?;
        Ok(seq)
    }

    /// Closed segments, oldest first: those before `active`.
    pub fn closed(&self, active: u64) -> std::io::Result<Vec<(u64, PathBuf)>> {
        Ok(segments(&self.dir)?
            .into_iter()
            .filter(|(seq, _)| *seq < active)
            .collect())
    }

    /// Keeps events the ledger refused for good in `rejected/` of the spool directory (outside
    /// the spool's count), for an operator to look at; returns the file.
    pub fn set_aside(&self, events: &[UsageEvent]) -> std::io::Result<PathBuf> {
        let dir = self.dir.join("rejected");
        std::fs::create_dir_all(&dir)?;
        let first = events.first().map_or("empty", |e| e.id.as_str());
        let path = dir.join(format!("{first}.{EXTENSION}"));
        let mut file = File::create(&path)?;
        let mut lines = Vec::new();
        for event in events {
            record::encode(Kind::Final, &Usage::of(event), &mut lines);
        }
        file.write_all(&lines)?;
        file.sync_all()?;
        Ok(path)
    }

    /// Deletes a closed segment that was sent.
    pub fn remove(&self, path: &Path) -> std::io::Result<()> {
        let size = std::fs::metadata(path)?.len();
        std::fs::remove_file(path)?;
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        Ok(())
    }
}

fn create(dir: &Path, seq: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(dir.join(format!("{seq:016}.{EXTENSION}")))
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
    let text = std::fs::read(path)?;
    let mut records = Vec::new();
    let mut torn = 0;
    let (whole, fragment) = match text.iter().rposition(|&b| b == b'\n') {
        Some(end) => (&text[..end], &text[end + 1..]),
        None => (&[][..], &text[..]),
    };
    if !fragment.is_empty() {
        torn += 1;
    }
    let legacy = path.extension().is_some_and(|e| e == LEGACY_EXTENSION);
    for line in whole.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
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
mod tests {
    use super::*;

    fn event(id: u8, units: u64) -> UsageEvent {
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
    fn records_survive_a_restart_and_a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        spool.append(&line(Kind::Pending, &event(1, 1))).unwrap();
        spool.append(&line(Kind::Final, &event(1, 1))).unwrap();
        let (seq, path) = segments(dir.path()).unwrap().remove(0);
        assert_eq!(seq, 1);
        // A crash mid-write leaves a line without its end (here: all of its fields, the last
        // one cut short).
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        let whole = line(Kind::Pending, &event(2, 1));
        file.write_all(&whole[..whole.len() - 3]).unwrap();
        drop(spool);
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
    fn no_part_of_a_failed_write_reads_as_a_record_nor_hides_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        spool.append(&line(Kind::Pending, &event(1, 1))).unwrap();
        // What a full disk may leave: any part of a line (here each cut of a whole line, its
        // newline excluded: a cut inside the last field still has all 14 fields), and the mark
        // the failed write sets.
        let whole = line(Kind::Final, &event(3, 1));
        for cut in 0..whole.len() {
            {
                let mut active = spool.active.lock().unwrap();
                active.file.write_all(&whole[..cut]).unwrap();
                active.bytes += cut as u64;
                active.fragment = true;
            }
            spool.append(&line(Kind::Final, &event(2, 1))).unwrap();
        }
        let active = spool.tick(10, 0).unwrap();
        let closed = spool.closed(active).unwrap();
        let (records, torn) = read(&closed[0].1).unwrap();
        let mut expected = vec![Record::Pending(Pending::of(&event(1, 1)))];
        expected.extend((0..whole.len()).map(|_| Record::Final(event(2, 1))));
        assert_eq!(records, expected, "no fragment reads as a record");
        assert_eq!(torn, whole.len());
        // The fragments' ends are counted with the records after them.
        let size = std::fs::metadata(&closed[0].1).unwrap().len();
        let fragments: u64 = (0..whole.len() as u64).sum();
        assert_eq!(spool.bytes(), size - fragments);
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
