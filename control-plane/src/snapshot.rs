//! The gateway snapshot as a gzip file, built once per config version and streamed to every
//! gateway that asks, so neither a million keys nor many gateways starting at once cost the
//! control plane more than a chunk of memory each.
//!
//! Building reads the store in one consistent transaction ([`Store::write_snapshot`]) and
//! compresses the JSON on a blocking thread into an unlinked temporary file. The file is kept
//! while the store's latest change stays the same; the next request after a change builds a new one
//! (one build at a time: concurrent requests wait for it and share it).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use tokio::sync::{Mutex, mpsc};

use crate::store::{Store, StoreError};

/// A snapshot at one version, gzip-compressed in a temporary file.
#[derive(Debug)]
pub struct SnapshotFile {
    /// The config version it is at.
    pub version: i64,
    /// When that version's change was made (`None` at version 0).
    pub version_at_ms: Option<i64>,
    /// Bytes of JSON it holds.
    pub json_bytes: u64,
    /// Bytes of gzip in the file.
    pub gzip_bytes: u64,
    /// How long building it took.
    pub build_time: Duration,
    file: Arc<File>,
}

impl SnapshotFile {
    /// Builds the snapshot of `store` as it is now.
    pub async fn build(store: &Store) -> Result<Self, StoreError> {
        let started = Instant::now();
        let (sender, mut receiver) = mpsc::channel::<Vec<u8>>(8);
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(File, u64, u64)> {
            let file = tempfile::tempfile()?;
            let mut gzip = GzEncoder::new(BufWriter::new(file), Compression::fast());
            let mut json_bytes = 0u64;
            while let Some(chunk) = receiver.blocking_recv() {
                json_bytes += chunk.len() as u64;
                gzip.write_all(&chunk)?;
            }
            let mut file = gzip.finish()?.into_inner().map_err(|e| e.into_error())?;
            let gzip_bytes = file.stream_position()?;
            Ok((file, json_bytes, gzip_bytes))
        });
        let version = store.write_snapshot(&sender).await;
        drop(sender);
        let written = writer
            .await
            .map_err(|e| io_error(std::io::Error::other(e)))?
            .map_err(io_error)?;
        let (version, version_at_ms) = version?;
        let (file, json_bytes, gzip_bytes) = written;
        Ok(Self {
            version,
            version_at_ms,
            json_bytes,
            gzip_bytes,
            build_time: started.elapsed(),
            file: Arc::new(file),
        })
    }

    /// The file's content, as gzip (`compressed`) or as plain JSON, in chunks read on a blocking
    /// thread; an error ends the stream.
    pub fn stream(&self, compressed: bool) -> mpsc::Receiver<std::io::Result<Bytes>> {
        let file = ReadAt {
            file: Arc::clone(&self.file),
            position: 0,
        };
        let (sender, receiver) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut reader: Box<dyn Read> = if compressed {
                Box::new(file)
            } else {
                Box::new(GzDecoder::new(file))
            };
            loop {
                let mut chunk = vec![0u8; 64 * 1024];
                let sent = match reader.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => {
                        chunk.truncate(n);
                        sender.blocking_send(Ok(Bytes::from(chunk)))
                    }
                    Err(error) => {
                        let _ = sender.blocking_send(Err(error));
                        return;
                    }
                };
                if sent.is_err() {
                    return; // the client went away
                }
            }
        });
        receiver
    }
}

/// Reads a shared file from its own position (`pread`), so concurrent readers do not disturb
/// each other.
struct ReadAt {
    file: Arc<File>,
    position: u64,
}

impl Read for ReadAt {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buffer, self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

fn io_error(error: std::io::Error) -> StoreError {
    StoreError::Database(sqlx::Error::Io(error))
}

/// The latest snapshot file, rebuilt when the store's version moved.
#[derive(Debug, Clone, Default)]
pub struct Snapshots {
    latest: Arc<Mutex<Option<Arc<SnapshotFile>>>>,
}

impl Snapshots {
    /// The snapshot at the store's latest version, built if needed: the file is reused while
    /// the store's latest change is the one it was built at (its version and its time, so a
    /// store restored from a backup under a running process, whose history has reached the same
    /// number again, is not served the old history's file).
    pub async fn current(&self, store: &Store) -> Result<Arc<SnapshotFile>, StoreError> {
        let mut latest = self.latest.lock().await;
        let mark = store.latest_mark().await?;
        if let Some(file) = latest
            .as_ref()
            .filter(|file| (file.version, file.version_at_ms) == mark)
        {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(SnapshotFile::build(store).await?);
        tracing::info!(
            version = file.version,
            json_bytes = file.json_bytes,
            gzip_bytes = file.gzip_bytes,
            build_ms = file.build_time.as_millis() as u64,
            "gateway snapshot built"
        );
        *latest = Some(Arc::clone(&file));
        Ok(file)
    }
}
