//! `gateway --replay-rejected`: sends the usage the ledger refused for good, kept in the spool's
//! `rejected/` directory, to the ledger again once the cause is mended (a control plane of
//! another version upgraded, say). The ledger keeps each event id once, so replaying a file
//! twice, or one whose events were partly stored, counts nothing twice.
//!
//! A file whose events are all stored is deleted; one the ledger still refuses is kept as it is
//! and named with the reason. An unavailable ledger stops the replay: what was not sent stays.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::ledger::{Ledger, LedgerError};
use super::record::{self, Record};
use super::segment::EXTENSION;

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
    files.retain(|path| path.extension().is_some_and(|e| e == EXTENSION));
    files.sort();
    let mut replayed = Replayed::default();
    for path in files {
        let text =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut events = Vec::new();
        let mut unreadable = 0;
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match record::decode(line) {
                Some(Record::Final(event)) => events.push(event),
                Some(Record::Pending(pending)) => match pending.event() {
                    Some(event) => events.push(event),
                    None => unreadable += 1,
                },
                None => unreadable += 1,
            }
        }
        if unreadable > 0 {
            replayed.kept.push((
                path,
                format!("{unreadable} line(s) are not usage records; nothing of it was sent"),
            ));
            continue;
        }
        let mut refused = None;
        for batch in events.chunks(batch_size.max(1)) {
            match ledger.record(batch).await {
                Ok(stored) => {
                    replayed.inserted += stored.inserted;
                    replayed.duplicates += stored.duplicates;
                }
                Err(LedgerError::Unavailable(error)) => {
                    return Err(error.context(format!(
                        "the ledger is unavailable; {} and the files after it stay",
                        path.display()
                    )));
                }
                Err(error) => {
                    refused = Some(error.to_string());
                    break;
                }
            }
        }
        match refused {
            Some(reason) => replayed.kept.push((path, reason)),
            None => {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot delete {}", path.display()))?;
                replayed.files_stored += 1;
            }
        }
    }
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tollgate_model::usage::{UsageEvent, UsageStored};

    use super::*;
    use crate::identity::index::Id;
    use crate::limits::period::Period;
    use crate::metering::spool::Spool;
    use crate::metering::spool::tests::event;

    /// A ledger in memory that refuses events whose method is `BAD`.
    #[derive(Debug, Default)]
    struct Memory(Mutex<Vec<String>>);

    #[async_trait]
    impl Ledger for Memory {
        async fn record(&self, events: &[UsageEvent]) -> Result<UsageStored, LedgerError> {
            if events.iter().any(|e| e.method == "BAD") {
                return Err(LedgerError::Rejected("422: bad method".into()));
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

    #[tokio::test]
    async fn stored_files_go_and_refused_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, 0).unwrap();
        let good = spool
            .set_aside(&[event(1, 1), event(2, 1), event(3, 1)])
            .unwrap();
        let mut bad = event(4, 1);
        bad.method = "BAD".into();
        let refused = spool.set_aside(&[bad]).unwrap();
        let ledger = Memory::default();
        ledger.0.lock().unwrap().push(event(2, 1).id);

        let replayed = replay(dir.path(), &ledger, 2).await.unwrap();
        assert_eq!(replayed.files_stored, 1);
        assert_eq!((replayed.inserted, replayed.duplicates), (2, 1));
        assert_eq!(replayed.kept.len(), 1);
        assert_eq!(replayed.kept[0].0, refused);
        assert!(
            replayed.kept[0].1.contains("bad method"),
            "{:?}",
            replayed.kept
        );
        assert!(!good.exists());
        assert!(refused.exists());

        // Again: the refused file is still refused, nothing is stored twice.
        let again = replay(dir.path(), &ledger, 2).await.unwrap();
        assert_eq!((again.files_stored, again.inserted), (0, 0));
        assert_eq!(again.kept.len(), 1);
        assert_eq!(ledger.0.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_file_that_is_not_usage_records_is_kept_unsent() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rejected")).unwrap();
        let path = dir
            .path()
            .join("rejected")
            .join(format!("notes.{EXTENSION}"));
        std::fs::write(&path, "not a record\n").unwrap();
        let ledger = Memory::default();
        let replayed = replay(dir.path(), &ledger, 10).await.unwrap();
        assert_eq!(replayed.kept.len(), 1);
        assert!(path.exists());
        assert!(ledger.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn nothing_to_replay_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let replayed = replay(dir.path(), &Memory::default(), 10).await.unwrap();
        assert_eq!(replayed, Replayed::default());
    }
}
