//! `gateway --replay-rejected`: sends the usage the ledger refused for good, kept in the spool's
//! `rejected/` directory, to the ledger again once the cause is mended (a control plane of
//! another version upgraded, say). The ledger keeps each event id once (while it keeps the raw
//! events), so replaying a file twice, or one whose events were partly stored, counts nothing
//! twice.
//!
//! A file whose events are all stored is deleted. Events the ledger still refuses stay, alone, in
//! their file, with the reason printed. A file that is not whole (empty, its last line cut
//! short, or a line that is not a final usage record) is kept unsent. An unavailable ledger stops
//! the replay: what was not stored stays. Files appear in `rejected/` whole (see
//! `Spool::set_aside`), so the command may run beside the gateway.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tollgate_model::usage::UsageEvent;

use super::ledger::{Ledger, LedgerError, take_refused};
use super::record::{self, Record};
use super::segment::EXTENSION;
use super::spool::{LEGACY_EXTENSION, write_finals};

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Files whose every event is now in the ledger (deleted).
    pub files_stored: usize,
    /// Events the ledger took as new.
    pub inserted: u64,
    /// Events it had already.
    pub duplicates: u64,
    /// Files kept, with why.
    pub kept: Vec<(PathBuf, String)>,
    /// Why the replay stopped before the end (the ledger unavailable), if it did.
    pub stopped: Option<String>,
}

/// How one file went.
enum Sent {
    /// Every event stored.
    All,
    /// These events refused for good, the others stored; why.
    Refused(Vec<UsageEvent>, String),
    /// The ledger is unavailable: stop.
    Unavailable(String),
}

/// Sends every file of `spool_dir/rejected` to `ledger`, `batch_size` events at a time.
pub async fn replay(
    spool_dir: &Path,
    ledger: &dyn Ledger,
    batch_size: usize,
) -> anyhow::Result<Replayed> {
    let dir = spool_dir.join("rejected");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|entry| entry.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("cannot list {}", dir.display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("cannot list {}", dir.display()));
        }
    };
    // Not the temporary files a gateway is writing (`.….partial`), nor anything else.
    files.retain(|path| {
        let visible = path
            .file_name()
            .is_some_and(|name| !name.to_string_lossy().starts_with('.'));
        let ours = path
            .extension()
            .is_some_and(|e| e == EXTENSION || e == LEGACY_EXTENSION);
        visible && ours
    });
    files.sort();
    let mut replayed = Replayed::default();
    for path in files {
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            // Taken by a replay running beside this one.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                replayed
                    .kept
                    .push((path, format!("cannot be read: {error}")));
                continue;
            }
        };
        let events = match events(&path, &text) {
            Ok(events) => events,
            Err(why) => {
                replayed.kept.push((path, why));
                continue;
            }
        };
        let count = events.len();
        match send(ledger, events, batch_size, &mut replayed).await {
            Sent::All => match remove(&path) {
                Ok(()) => replayed.files_stored += 1,
                // Stored: a later replay finds its events in the ledger already.
                Err(error) => replayed
                    .kept
                    .push((path, format!("stored, but cannot be deleted: {error:#}"))),
            },
            Sent::Refused(refused, reason) => {
                let why = format!("{} event(s) refused again: {reason}", refused.len());
                if refused.len() == count {
                    replayed.kept.push((path, why));
                } else {
                    match keep_only(&path, &refused) {
                        Ok(kept) => replayed.kept.push((kept, why)),
                        Err(error) => replayed.kept.push((
                            path,
                            format!("{why} (the others stored; cannot rewrite it: {error:#})"),
                        )),
                    }
                }
            }
            Sent::Unavailable(reason) => {
                replayed.stopped = Some(format!(
                    "the ledger is unavailable ({reason}); {} and the files after it were not \
                     sent",
                    path.display()
                ));
                break;
            }
        }
    }
    Ok(replayed)
}

/// The events of a set-aside file, or why it is kept unsent.
fn events(path: &Path, text: &[u8]) -> Result<Vec<UsageEvent>, String> {
    if text.is_empty() {
        return Err("empty".to_owned());
    }
    if !text.ends_with(b"\n") {
        return Err("its last line is cut short; nothing of it was sent".to_owned());
    }
    let legacy = path.extension().is_some_and(|e| e == LEGACY_EXTENSION);
    let mut events = Vec::new();
    let mut foreign = 0;
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let record = if legacy {
            record::decode_legacy(line)
        } else {
            record::decode(line)
        };
        // A set-aside file holds final records only.
        match record {
            Some(Record::Final(event)) => events.push(event),
            _ => foreign += 1,
        }
    }
    if foreign > 0 {
        return Err(format!(
            "{foreign} line(s) are not final usage records; nothing of it was sent"
        ));
    }
    Ok(events)
}

/// Sends `events` in batches: halved when too large, without the events the ledger names when it
/// refuses some, whole batches kept when it refuses them whole.
async fn send(
    ledger: &dyn Ledger,
    mut events: Vec<UsageEvent>,
    batch_size: usize,
    replayed: &mut Replayed,
) -> Sent {
    // Split off from the end, so the first batch is the last pushed: the first popped.
    let size = batch_size.max(1);
    let mut batches = Vec::new();
    while !events.is_empty() {
        let start = (events.len() - 1) / size * size;
        batches.push(events.split_off(start));
    }
    let mut refused = Vec::new();
    let mut reason = String::new();
    while let Some(mut batch) = batches.pop() {
        match ledger.record(&batch).await {
            Ok(stored) => {
                replayed.inserted += stored.inserted;
                replayed.duplicates += stored.duplicates;
            }
            Err(LedgerError::Unavailable(error)) => return Sent::Unavailable(format!("{error:#}")),
            Err(LedgerError::TooLarge(_)) if batch.len() > 1 => {
                let second = batch.split_off(batch.len() / 2);
                batches.push(second);
                batches.push(batch);
            }
            Err(LedgerError::RefusedEvents(positions, why)) => {
                match take_refused(&mut batch, &positions) {
                    Some(taken) => {
                        refused.extend(taken);
                        if !batch.is_empty() {
                            batches.push(batch);
                        }
                    }
                    // Not positions of this batch: all of it stays refused.
                    None => refused.append(&mut batch),
                }
                reason = why;
            }
            Err(error) => {
                reason = error.to_string();
                refused.extend(batch);
            }
        }
    }
    if refused.is_empty() {
        Sent::All
    } else {
        Sent::Refused(refused, reason)
    }
}

/// Replaces the file at `path` with one of `events` only (as `.tsv`); returns its path.
fn keep_only(path: &Path, events: &[UsageEvent]) -> anyhow::Result<PathBuf> {
    let kept = path.with_extension(EXTENSION);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = kept.file_name().map(|n| n.to_string_lossy().into_owned());
    let temporary = dir.join(format!(".{}.partial", name.unwrap_or_default()));
    write_finals(&temporary, events)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, &kept)
        .with_context(|| format!("cannot write {}", kept.display()))?;
    if kept != path {
        remove(path)?;
    }
    Ok(kept)
}

fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("cannot delete {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tollgate_model::usage::{UsageEvent, UsageStored};

    use super::*;
    use crate::identity::index::Id;
    use crate::limits::period::Period;
    use crate::metering::record::{Kind, Usage};
    use crate::metering::spool::Spool;
    use crate::metering::spool::tests::event;

    /// A ledger in memory that refuses events whose method is `BAD` (naming them, as the
    /// control plane does) and is unavailable while `down` is set.
    #[derive(Debug, Default)]
    struct Memory(Mutex<Vec<String>>, std::sync::atomic::AtomicBool);

    #[async_trait]
    impl Ledger for Memory {
        async fn record(&self, events: &[UsageEvent]) -> Result<UsageStored, LedgerError> {
            if self.1.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(LedgerError::Unavailable(anyhow::anyhow!("down")));
            }
            let bad: Vec<usize> = events
                .iter()
                .enumerate()
                .filter(|(_, e)| e.method == "BAD")
                .map(|(i, _)| i)
                .collect();
            if !bad.is_empty() {
                return Err(LedgerError::RefusedEvents(bad, "422: bad method".into()));
            }
            let mut stored = self.0.lock().unwrap();
            let before = stored.len();
            for event in events {
                if !stored.contains(&event.id) {
                    stored.push(event.id.clone());
                }
            }
            let inserted = (stored.len() - before) as u64;
            Ok(UsageStored {
                inserted,
                duplicates: events.len() as u64 - inserted,
            })
        }

        async fn period_usage(&self, _: &Id, _: Period) -> anyhow::Result<(u64, u64)> {
            Ok((0, 0))
        }
    }

    fn bad(id: u8) -> UsageEvent {
        let mut event = event(id, 1);
        event.method = "BAD".into();
        event
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir.join("rejected")).unwrap();
        let path = dir.join("rejected").join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[tokio::test]
    async fn stored_files_go_and_refused_events_stay_alone() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        let good = spool
            .set_aside(&[event(1, 1), event(2, 1), event(3, 1)])
            .unwrap();
        let mixed = spool
            .set_aside(&[event(5, 1), bad(6), event(7, 1)])
            .unwrap();
        let ledger = Memory::default();
        ledger.0.lock().unwrap().push(event(2, 1).id);

        let replayed = replay(dir.path(), &ledger, 2).await.unwrap();
        assert_eq!(replayed.files_stored, 1);
        assert_eq!((replayed.inserted, replayed.duplicates), (4, 1));
        assert_eq!(replayed.stopped, None);
        assert_eq!(replayed.kept.len(), 1);
        assert_eq!(replayed.kept[0].0, mixed);
        assert!(
            replayed.kept[0]
                .1
                .contains("1 event(s) refused again: 422: bad method")
        );
        assert!(!good.exists());
        // The mixed file now holds the refused event only.
        let left = std::fs::read_to_string(&mixed).unwrap();
        assert_eq!(left.lines().count(), 1);
        assert!(left.contains(&bad(6).id));

        // Again: still refused, nothing stored twice.
        let again = replay(dir.path(), &ledger, 2).await.unwrap();
        assert_eq!(
            (again.files_stored, again.inserted, again.duplicates),
            (0, 0, 0)
        );
        assert_eq!(again.kept.len(), 1);
        assert_eq!(ledger.0.lock().unwrap().len(), 5);
    }

    #[tokio::test]
    async fn a_file_that_is_not_whole_is_kept_unsent() {
        let dir = tempfile::tempdir().unwrap();
        let mut line = Vec::new();
        record::encode(Kind::Final, &Usage::of(&event(1, 1)), &mut line);
        let whole = String::from_utf8(line).unwrap();
        let mut pending = Vec::new();
        record::encode(Kind::Pending, &Usage::of(&event(2, 1)), &mut pending);
        let empty = write(dir.path(), "a.tsv", "");
        let cut = write(dir.path(), "b.tsv", &whole[..whole.len() - 1]);
        let foreign = write(dir.path(), "c.tsv", "not a record\n");
        let pending = write(dir.path(), "d.tsv", &String::from_utf8(pending).unwrap());
        // Being written by a gateway, or not ours: not read.
        write(dir.path(), &format!(".e.tsv.{}.partial", 1), &whole);
        write(dir.path(), "notes.txt", "mine");
        let ledger = Memory::default();
        let replayed = replay(dir.path(), &ledger, 10).await.unwrap();
        let kept: Vec<&PathBuf> = replayed.kept.iter().map(|(path, _)| path).collect();
        assert_eq!(kept, [&empty, &cut, &foreign, &pending]);
        assert!(ledger.0.lock().unwrap().is_empty());
        assert_eq!(replayed.files_stored, 0);
    }

    #[tokio::test]
    async fn an_unavailable_ledger_stops_the_replay_and_leaves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        let first = spool.set_aside(&[event(1, 1)]).unwrap();
        let second = spool.set_aside(&[event(2, 1)]).unwrap();
        let ledger = Memory::default();
        ledger.1.store(true, std::sync::atomic::Ordering::Relaxed);
        let replayed = replay(dir.path(), &ledger, 10).await.unwrap();
        assert!(replayed.stopped.as_deref().unwrap().contains("unavailable"));
        assert!(first.exists() && second.exists());
        ledger.1.store(false, std::sync::atomic::Ordering::Relaxed);
        let replayed = replay(dir.path(), &ledger, 10).await.unwrap();
        assert_eq!((replayed.files_stored, replayed.stopped), (2, None));
    }

    /// A file an earlier version set aside (`.jsonl`, one `{"e": event}` a line) is replayed
    /// as well; what the ledger still refuses of it stays in a `.tsv` file of the same name.
    #[tokio::test]
    async fn a_file_an_earlier_version_set_aside_is_replayed_too() {
        let dir = tempfile::tempdir().unwrap();
        let lines: String = [event(1, 1), bad(2), event(3, 1)]
            .iter()
            .map(|e| format!("{}\n", serde_json::json!({ "e": e })))
            .collect();
        let legacy = write(dir.path(), "evt_legacy.jsonl", &lines);
        let ledger = Memory::default();

        let replayed = replay(dir.path(), &ledger, 10).await.unwrap();
        assert_eq!((replayed.inserted, replayed.duplicates), (2, 0));
        assert_eq!(*ledger.0.lock().unwrap(), [event(1, 1).id, event(3, 1).id]);
        let kept = legacy.with_extension("tsv");
        assert_eq!(replayed.kept.len(), 1);
        assert_eq!(replayed.kept[0].0, kept);
        assert!(!legacy.exists(), "the legacy file is replaced");
        let left = std::fs::read(&kept).unwrap();
        let records: Vec<Record> = left
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| record::decode(line).unwrap())
            .collect();
        assert_eq!(records, [Record::Final(bad(2))]);
    }

    #[tokio::test]
    async fn nothing_to_replay_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let replayed = replay(dir.path(), &Memory::default(), 10).await.unwrap();
        assert_eq!(replayed, Replayed::default());
    }
}
