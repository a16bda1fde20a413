//! Reading a snapshot's JSON entry by entry, straight into the index, so a million keys never
//! exist as a document or as a vector of feed records: only as compact entries. A snapshot
//! being downloaded is read as its chunks arrive, and copied to a file on the way.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use serde::Deserializer;
use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tokio::sync::mpsc;
use tollgate_model::feed::{CustomerRecord, KeyRecord};
use tollgate_model::plan::Plan;

use super::index::{Builder, Identities, Invalid, ScopeInterner, customer_entry, key_entry};

/// Reads a snapshot (plain JSON) and checks it.
pub fn read(reader: impl Read, interner: &mut ScopeInterner) -> Result<Identities, Invalid> {
    let mut deserializer = serde_json::Deserializer::from_reader(std::io::BufReader::new(reader));
    let builder = SnapshotSeed { interner }
        .deserialize(&mut deserializer)
        .map_err(|error| Invalid(format!("not a valid snapshot: {error}")))?;
    deserializer
        .end()
        .map_err(|error| Invalid(format!("not a valid snapshot: {error}")))?;
    builder.build()
}

struct SnapshotSeed<'a> {
    interner: &'a mut ScopeInterner,
}

impl<'de> DeserializeSeed<'de> for SnapshotSeed<'_> {
    type Value = Builder;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Builder, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SnapshotSeed<'_> {
    type Value = Builder;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a snapshot object {version, plans, customers, keys}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Builder, A::Error> {
        let mut builder = Builder::default();
        let mut seen = [false; 4];
        while let Some(name) = map.next_key::<String>()? {
            match name.as_str() {
                "version" => {
                    builder.version = map.next_value()?;
                    if builder.version < 0 {
                        return Err(A::Error::custom("version is negative"));
                    }
                    seen[0] = true;
                }
                "version_at_ms" => {
                    builder.version_at_ms = map.next_value()?;
                }
                "plans" => {
                    for plan in map.next_value::<Vec<Plan>>()? {
                        let id: Arc<str> = plan.id.as_str().into();
                        if builder.plans.insert(id, Arc::new(plan)).is_some() {
                            return Err(A::Error::custom("a plan id appears twice"));
                        }
                    }
                    seen[1] = true;
                }
                "customers" => {
                    map.next_value_seed(Customers(&mut builder))?;
                    seen[2] = true;
                }
                "keys" => {
                    map.next_value_seed(Keys {
                        builder: &mut builder,
                        interner: &mut *self.interner,
                    })?;
                    seen[3] = true;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        for (present, name) in seen.iter().zip(["version", "plans", "customers", "keys"]) {
            if !present {
                return Err(A::Error::missing_field(name));
            }
        }
        Ok(builder)
    }
}

struct Customers<'a>(&'a mut Builder);

impl<'de> DeserializeSeed<'de> for Customers<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Customers<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of customers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(record) = seq.next_element::<CustomerRecord>()? {
            let (id, entry) = customer_entry(&record).map_err(A::Error::custom)?;
            if self.0.customers.insert(id, entry).is_some() {
                return Err(A::Error::custom(format!(
                    "customer {} appears twice",
                    record.id
                )));
            }
        }
        Ok(())
    }
}

struct Keys<'a> {
    builder: &'a mut Builder,
    interner: &'a mut ScopeInterner,
}

impl<'de> DeserializeSeed<'de> for Keys<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Keys<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of keys")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(record) = seq.next_element::<KeyRecord>()? {
            let entry = key_entry(&record, self.interner).map_err(A::Error::custom)?;
            self.builder.keys.push(entry);
        }
        Ok(())
    }
}

/// Reads the streamed snapshot: every chunk is written to `partial` as received and read,
/// decompressed if `gzip`, into the index. Returns with it whether `partial` holds all of it:
/// a file that cannot be written (a full disk, a directory the gateway may not write) costs
/// the copy kept for restarts, never the snapshot itself.
pub(super) fn read_streamed(
    receiver: mpsc::Receiver<Bytes>,
    partial: &Path,
    gzip: bool,
) -> Result<(Identities, Result<(), String>), Invalid> {
    let file =
        File::create(partial).map_err(|e| format!("cannot write {}: {e}", partial.display()));
    let mut tee = Tee {
        receiver,
        chunk: Bytes::new(),
        file,
    };
    let mut interner = ScopeInterner::default();
    let identities = if gzip {
        read(flate2::read::GzDecoder::new(&mut tee), &mut interner)?
    } else {
        read(&mut tee, &mut interner)?
    };
    let written = tee.file.map(drop);
    if written.is_err() {
        let _ = std::fs::remove_file(partial);
    }
    Ok((identities, written))
}

/// Reads chunks from a channel, writing each to a file on the way while it can; once a write
/// fails, `file` holds why and the rest is only read.
struct Tee {
    receiver: mpsc::Receiver<Bytes>,
    chunk: Bytes,
    file: Result<File, String>,
}

impl Tee {
    fn write(&mut self, chunk: Option<&[u8]>) {
        if let Ok(file) = &mut self.file {
            let written = match chunk {
                Some(chunk) => file.write_all(chunk),
                None => file.sync_all(),
            };
            if let Err(error) = written {
                self.file = Err(format!("cannot write the snapshot's copy: {error}"));
            }
        }
    }
}

impl Read for &mut Tee {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => {
                    self.write(Some(&chunk));
                    self.chunk = chunk;
                }
                None => {
                    self.write(None);
                    return Ok(0);
                }
            }
        }
        let n = buffer.len().min(self.chunk.len());
        buffer[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}
