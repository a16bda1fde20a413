//! One spool segment while records are written to it: a file of [`SEGMENT_BYTES`], allocated
//! up front and mapped shared, so that a record is one copy into the file's page cache (see
//! [`super::spool`] for why); and what is done to a segment a killed process left mapped.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use memmap2::MmapMut;

/// The file extension of a segment: tab-separated values.
pub const EXTENSION: &str = "tsv";

/// The size of a segment: what its file is created at, and the most its records take.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// A segment's file and its mapping, while records are copied into it.
#[derive(Debug)]
pub struct Mapped {
    file: File,
    /// `None` once unmapped.
    map: Option<MmapMut>,
    /// Bytes of records written from the start.
    len: usize,
}

impl Mapped {
    /// Creates segment `seq` in `dir` at its full size and maps it; on any error nothing is
    /// left behind.
    pub fn create(dir: &Path, seq: u64) -> std::io::Result<Self> {
        let path = dir.join(format!("{seq:016}.{EXTENSION}"));
        let mut file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let mapped = allocate(&mut file).and_then(|()| map(&file));
        match mapped {
            Ok(map) => Ok(Self {
                file,
                map: Some(map),
                len: 0,
            }),
            Err(error) => {
                drop(file);
                let _ = std::fs::remove_file(&path);
                Err(error)
            }
        }
    }

    /// Whether no record was copied into it yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A second handle on its file, to sync it without holding the spool's lock.
    pub fn sync_handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Copies `line` after the records; where it starts, or `None` when it does not fit.
    pub fn push(&mut self, line: &[u8]) -> Option<usize> {
        let start = self.len;
        let end = start + line.len();
        let room = self.map.as_mut()?.get_mut(start..end)?;
        room.copy_from_slice(line);
        self.len = end;
        Some(start)
    }

    /// The record bytes at `start..start + len`, while the segment is mapped.
    pub fn record_mut(&mut self, start: usize, len: usize) -> Option<&mut [u8]> {
        let end = start.checked_add(len).filter(|&end| end <= self.len)?;
        self.map.as_mut()?.get_mut(start..end)
    }

    /// Unmaps the segment, cuts its file to the records and syncs it.
    pub fn close(&mut self) -> std::io::Result<()> {
        self.map = None;
        self.file.set_len(self.len as u64)?;
        self.file.sync_data()
    }
}

impl Drop for Mapped {
    /// A segment dropped without [`close`](Mapped::close) (a spool dropped in a test; a gateway
    /// ends with `process::exit`, so there it is the next start that cuts it) is cut to its
    /// records all the same; if that fails, the reader skips the zeros.
    fn drop(&mut self) {
        if self.map.take().is_some() {
            let _ = self.file.set_len(self.len as u64);
        }
    }
}

/// Gives a new segment's file its blocks, all of [`SEGMENT_BYTES`]: a copy into the mapping
/// must never be the first to need a block (on a full disk that is a `SIGBUS`, where `write(2)`
/// returned an error). Where the file system has no `fallocate`, zeros are written instead.
fn allocate(file: &mut File) -> std::io::Result<()> {
    let size = SEGMENT_BYTES as i64;
    match nix::fcntl::fallocate(&*file, nix::fcntl::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => {
            let zeros = vec![0_u8; 64 * 1024];
            for _ in 0..SEGMENT_BYTES / zeros.len() as u64 {
                file.write_all(&zeros)?;
            }
            Ok(())
        }
        Err(errno) => Err(errno.into()),
    }
}

/// Maps a segment's whole file, shared: copies into it are the file's page cache.
#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<MmapMut> {
    // SAFETY: the mapping is only touched through `Mapped::push` (a copy after the records) and
    // `Mapped::record_mut` (a record already copied, compared and rewritten in place), within the
    // file's length, under the spool's mutex; nothing else reads it while mapped, and it is
    // unmapped before the file is cut. The file is this process's own: created here
    // with `create_new`, at its full size, and cut only after it is unmapped. Another process
    // cutting it short would make a copy fault; the spool's documentation (and the README) say
    // that the spool directory belongs to one gateway.
    unsafe { MmapMut::map_mut(file) }
}

/// Cuts a segment a killed process left mapped to its records: they end where the zeros of its
/// unwritten rest begin (a record never holds a zero byte). Returns its size.
pub fn cut_to_records(path: &Path) -> std::io::Result<u64> {
    let size = std::fs::metadata(path)?.len();
    if size == 0 {
        return Ok(0);
    }
    let mut file = File::open(path)?;
    let mut last = [0_u8; 1];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::End(-1))?;
    std::io::Read::read_exact(&mut file, &mut last)?;
    if last[0] != 0 {
        return Ok(size);
    }
    let records = records_end(&std::fs::read(path)?) as u64;
    OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(records)?;
    Ok(records)
}

/// Where the records of a segment's bytes end: before the zeros at its end, if any. Zeros
/// elsewhere (blocks a power loss left unwritten) stay, inside a line the reader skips as torn.
pub fn records_end(bytes: &[u8]) -> usize {
    match bytes.last() {
        Some(0) => bytes
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |last| last + 1),
        _ => bytes.len(),
    }
}
