//! The last good state on disk: the snapshot as received and a journal of the change pages
//! applied after it, so that a gateway restarted while the control plane is down serves at once.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use tollgate_model::feed::Changes;

use super::index::{Applied, Identities, Invalid, ScopeInterner};
use super::snapshot;

/// The stored snapshot and the changes applied after it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The snapshot as received (gzip or plain JSON).
    pub snapshot: PathBuf,
    /// One JSON `Changes` per line.
    pub journal: PathBuf,
}

impl Stored {
    /// The files for `snapshot`: the journal sits beside it.
    pub fn new(snapshot: PathBuf) -> Self {
        let mut journal = snapshot.clone().into_os_string();
        journal.push(".changes");
        Self {
            snapshot,
            journal: PathBuf::from(journal),
        }
    }

    /// Unix ms `path` was last modified, if it can be read.
    fn modified_ms(path: &Path) -> Option<i64> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
        let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    pub(super) fn temporary(&self) -> PathBuf {
        let mut path = self.snapshot.clone().into_os_string();
        path.push(".partial");
        PathBuf::from(path)
    }

    /// Loads the stored snapshot and replays the journal. `Ok(None)` when nothing is stored.
    pub fn restore(&self, interner: &mut ScopeInterner) -> Result<Option<Restored>, Invalid> {
        let file = match File::open(&self.snapshot) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(Invalid(format!(
                    "cannot read {}: {error}",
                    self.snapshot.display()
                )));
            }
        };
        let mut identities = snapshot::read(decoded(file), interner)?;
        // How old the state is: when its snapshot was stored, or its last replayed page
        // written (the journal's time for a page of an earlier version, which wrote none; read
        // before a cut, which sets it to now).
        let mut written_at_ms = Self::modified_ms(&self.snapshot).unwrap_or(0);
        let journal_written_ms = Self::modified_ms(&self.journal).unwrap_or(0);
        let mut pages = 0;
        let mut journal_follows = true;
        if let Ok(journal) = File::open(&self.journal) {
            // Replay stops at a torn line (a crash mid-write) or a gap (a page that does not
            // start where the last one ended); the journal is cut there, so later appends
            // follow on from what was replayed, and the feed fills the rest.
            let mut kept = 0u64;
            let mut cut = false;
            for line in BufReader::new(journal).split(b'\n') {
                let Ok(line) = line else {
                    cut = true;
                    break;
                };
                let Ok(entry) = serde_json::from_slice::<JournalPage>(&line) else {
                    cut = true;
                    break;
                };
                if entry.page.version > identities.version {
                    if entry.since != identities.version {
                        cut = true;
                        break;
                    }
                    match apply(&identities, &entry.page, interner)? {
                        Applied::Next(next) => identities = next,
                        Applied::NeedsSnapshot(_) => {
                            cut = true;
                            break;
                        }
                    }
                }
                pages += 1;
                kept += line.len() as u64 + 1;
                written_at_ms = written_at_ms.max(entry.at_ms.unwrap_or(journal_written_ms));
            }
            if cut
                && let Err(error) = OpenOptions::new()
                    .write(true)
                    .open(&self.journal)
                    .and_then(|file| file.set_len(kept))
            {
                tracing::warn!(%error, file = %self.journal.display(), "cannot cut the journal");
                journal_follows = false;
            }
        }
        Ok(Some(Restored {
            identities,
            pages,
            written_at_ms,
            journal_follows,
        }))
    }

    pub(super) fn append(&self, since: i64, page: &Changes) -> std::io::Result<()> {
        let entry = JournalPage {
            since,
            at_ms: Some(super::unix_ms()),
            page: page.clone(),
        };
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)?;
        journal.write_all(&line)?;
        journal.sync_data()
    }
}

/// What a restart finds stored.
#[derive(Debug)]
pub struct Restored {
    /// The snapshot with the journal's pages applied.
    pub identities: Identities,
    /// Pages replayed.
    pub pages: usize,
    /// Unix ms that state was stored (its age).
    pub written_at_ms: i64,
    /// Whether pages appended to the journal follow on from it (false when what the replay
    /// stopped at could not be cut away: a page appended after it would never be replayed).
    pub journal_follows: bool,
}

/// One line of the journal: a page of changes and the version it was applied on.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct JournalPage {
    /// The version the page starts from.
    since: i64,
    /// Unix ms it was written (absent in a journal of an earlier version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at_ms: Option<i64>,
    /// The page.
    #[serde(flatten)]
    page: Changes,
}

/// A snapshot file as plain JSON, whether it was stored gzip-compressed or not.
fn decoded(mut file: File) -> Box<dyn Read + Send> {
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let file = Box::new(std::io::Cursor::new(magic).chain(file));
    if gzip {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        file
    }
}

pub(super) fn apply(
    identities: &Identities,
    page: &Changes,
    interner: &mut ScopeInterner,
) -> Result<Applied, Invalid> {
    let entities = page.changes.iter().map(|change| &change.entity);
    // The page's mark of its version: none from a control plane of an earlier version, whose
    // changes are then asked for by version alone.
    identities.apply(page.version, page.version_at_ms, entities, interner)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const CUSTOMER: &str = "cus_00000000000000000000000000000001";

    fn plan_json() -> serde_json::Value {
        serde_json::json!({
            "id": "plan_1", "name": "p", "rate_limits": [], "quota": null, "price": null,
            "status": "active", "created_at": "t", "updated_at": "t"
        })
    }

    fn key_change(version: i64, n: u8) -> serde_json::Value {
        serde_json::json!({
            "version": version, "kind": "key", "id": format!("key_{:032x}", n),
            "key": {
                "id": format!("key_{:032x}", n), "customer_id": CUSTOMER,
                "hash": format!("{:064x}", n), "expires_at_ms": null, "revoked_at_ms": null,
                "scopes": null
            }
        })
    }

    fn line(since: i64, version: i64, n: u8) -> String {
        serde_json::json!({"since": since, "version": version, "changes": [key_change(version, n)]})
            .to_string()
    }

    fn stored(journal: &str) -> (tempfile::TempDir, Stored) {
        let dir = tempfile::tempdir().unwrap();
        let stored = Stored::new(dir.path().join("snapshot.json"));
        let snapshot = serde_json::json!({
            "version": 7, "plans": [plan_json()],
            "customers": [{"id": CUSTOMER, "plan_id": "plan_1", "status": "active"}],
            "keys": []
        });
        std::fs::write(&stored.snapshot, snapshot.to_string()).unwrap();
        std::fs::write(&stored.journal, journal).unwrap();
        (dir, stored)
    }

    #[test]
    fn the_journal_is_replayed_in_order_and_cut_at_a_torn_line() {
        let good = format!("{}\n{}\n", line(7, 8, 1), line(8, 9, 2));
        let (_dir, stored) = stored(&format!("{good}{{\"since\": 9, \"vers"));
        let Restored {
            identities, pages, ..
        } = stored
            .restore(&mut ScopeInterner::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (identities.version, pages, identities.key_count()),
            (9, 2, 2)
        );
        assert_eq!(std::fs::read_to_string(&stored.journal).unwrap(), good);
        // What is appended next follows on from the replayed pages.
        let page: Changes = serde_json::from_str(&line(9, 10, 3)).unwrap();
        stored.append(9, &page).unwrap();
        let identities = stored
            .restore(&mut ScopeInterner::default())
            .unwrap()
            .unwrap()
            .identities;
        assert_eq!((identities.version, identities.key_count()), (10, 3));
    }

    #[test]
    fn a_gap_in_the_journal_stops_the_replay_there() {
        // The page from 8 to 9 is missing: the page from 9 must not be applied on 8.
        let (_dir, stored) = stored(&format!("{}\n{}\n", line(7, 8, 1), line(9, 10, 3)));
        let Restored {
            identities, pages, ..
        } = stored
            .restore(&mut ScopeInterner::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (identities.version, pages, identities.key_count()),
            (8, 1, 1)
        );
        assert_eq!(
            std::fs::read_to_string(&stored.journal).unwrap(),
            format!("{}\n", line(7, 8, 1))
        );
    }

    #[test]
    fn the_age_of_what_is_restored_is_when_it_was_written_not_when_the_journal_was_cut() {
        let hour_ago = super::super::unix_ms() - 3_600_000;
        let mut first: serde_json::Value = serde_json::from_str(&line(7, 8, 1)).unwrap();
        first["at_ms"] = serde_json::json!(hour_ago);
        // A page that does not follow on (journaled after a snapshot that was not stored) is
        // cut, which writes the journal now.
        let (_dir, cut) = stored(&format!("{first}\n{}\n", line(9, 10, 3)));
        let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7_200);
        File::options()
            .write(true)
            .open(&cut.snapshot)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let restored = cut.restore(&mut ScopeInterner::default()).unwrap().unwrap();
        assert_eq!((restored.identities.version, restored.pages), (8, 1));
        assert_eq!(restored.written_at_ms, hour_ago);
        // Nothing replayed from the journal: the snapshot's own time.
        let (_other, unreplayed) = stored(&format!("{}\n", line(9, 10, 3)));
        File::options()
            .write(true)
            .open(&unreplayed.snapshot)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let restored = unreplayed
            .restore(&mut ScopeInterner::default())
            .unwrap()
            .unwrap();
        let expected = two_hours_ago
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert_eq!((restored.pages, restored.written_at_ms), (0, expected));
    }

    #[test]
    fn nothing_stored_is_no_identities() {
        let dir = tempfile::tempdir().unwrap();
        let stored = Stored::new(dir.path().join("absent.json.gz"));
        assert!(
            stored
                .restore(&mut ScopeInterner::default())
                .unwrap()
                .is_none()
        );
    }
}
