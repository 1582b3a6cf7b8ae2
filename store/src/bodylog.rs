//! Message bodies, outside sled: append-only segment files.
//!
//! Why: a B-tree is the wrong home for 10 KB blobs that live a few
//! milliseconds. In sled they caused node splits and page rewrites into its
//! log, a third of the relay's CPU. Here a body is one `write` at the end of
//! the active segment; group commit makes it durable with one `fdatasync`
//! for every body written since the last one; a segment file is deleted when
//! its last body is released.
//!
//! Record layout: `MAGIC (4) | length u32 LE | crc32 u32 LE | body`. The
//! [`BodyRef`] kept in sled points at the body and carries its length and
//! CRC, so a body cut short by a crash (never acknowledged: it was not yet
//! synced) is recognised on open and its message swept.
//!
//! After a restart the relay never appends to an old segment (its tail may be
//! torn): it starts a new one.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};

use crate::{Result, StoreError};

const MAGIC: &[u8; 4] = b"DAB1";
const HEADER: u64 = 12;
/// A new segment is started past this size.
const SEGMENT_MAX: u64 = 64 * 1024 * 1024;

/// Where a body is: kept in sled's `queue_body` tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyRef {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

struct Active {
    segment: u64,
    file: File,
    len: u64,
}

struct Inner {
    active: Option<Active>,
    /// Segments closed since the last sync: they still need their fsync.
    closed_unsynced: Vec<File>,
    /// Live bodies per segment; a segment at zero (and not active) is deleted.
    live: HashMap<u64, usize>,
    next_segment: u64,
}

pub(crate) struct BodyLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

fn segment_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let hex = name.strip_suffix(".log")?;
    u64::from_str_radix(hex, 16).ok()
}

impl BodyLog {
    pub(crate) fn open(dir: &Path) -> Result<BodyLog> {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let mut max = 0;
        for entry in std::fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))? {
            let path = entry.map_err(|e| io("cannot list", dir, e))?.path();
            if let Some(n) = segment_number(&path) {
                max = max.max(n);
            }
        }
        Ok(BodyLog {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                active: None,
                closed_unsynced: Vec::new(),
                live: HashMap::new(),
                next_segment: max + 1,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:016x}.log"))
    }

    /// Appends a body (not synced: see [`BodyLog::sync`]).
    pub(crate) fn append(&self, body: &[u8]) -> Result<BodyRef> {
        let len = u32::try_from(body.len())
            .map_err(|_| StoreError::Invalid("message body over 4 GiB".into()))?;
        let crc = crc32fast::hash(body);
        let mut inner = self.lock();
        let full = inner
            .active
            .as_ref()
            .is_none_or(|a| a.len > 0 && a.len + HEADER + u64::from(len) > SEGMENT_MAX);
        if full {
            self.start_segment(&mut inner)?;
        }
        let Some(active) = inner.active.as_mut() else {
            return Err(StoreError::Io("no active body segment".into()));
        };
        let mut record = Vec::with_capacity(HEADER as usize + body.len());
        record.extend_from_slice(MAGIC);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc.to_le_bytes());
        record.extend_from_slice(body);
        let path = self.path(active.segment);
        active
            .file
            .write_all(&record)
            .map_err(|e| io("cannot write", &path, e))?;
        let r = BodyRef {
            segment: active.segment,
            offset: active.len + HEADER,
            len,
            crc,
        };
        active.len += record.len() as u64;
        *inner.live.entry(r.segment).or_insert(0) += 1;
        Ok(r)
    }

    fn start_segment(&self, inner: &mut Inner) -> Result<()> {
        let segment = inner.next_segment;
        inner.next_segment += 1;
        let path = self.path(segment);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| io("cannot create", &path, e))?;
        // The new file's directory entry must survive a crash too.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync", &self.dir, e))?;
        if let Some(old) = inner.active.replace(Active {
            segment,
            file,
            len: 0,
        }) {
            let old_segment = old.segment;
            inner.closed_unsynced.push(old.file);
            if inner.live.get(&old_segment).copied().unwrap_or(0) == 0 {
                let _ = std::fs::remove_file(self.path(old_segment));
            }
        }
        Ok(())
    }

    /// Makes every body appended so far durable (`fdatasync`).
    pub(crate) fn sync(&self) -> Result<()> {
        let (active, closed) = {
            let mut inner = self.lock();
            let active = match &inner.active {
                Some(a) => Some(
                    a.file
                        .try_clone()
                        .map_err(|e| io("cannot sync", &self.dir, e))?,
                ),
                None => None,
            };
            (active, std::mem::take(&mut inner.closed_unsynced))
        };
        for file in closed.iter().chain(active.iter()) {
            file.sync_data()
                .map_err(|e| io("cannot sync", &self.dir, e))?;
        }
        Ok(())
    }

    /// Reads a body; `None` when its record is missing or damaged (a write
    /// that a crash cut short).
    pub(crate) fn read(&self, r: &BodyRef) -> Result<Option<Vec<u8>>> {
        let path = self.path(r.segment);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot open", &path, e)),
        };
        let mut header = [0u8; HEADER as usize];
        let mut body = vec![0u8; r.len as usize];
        let ok = r.offset >= HEADER
            && file.read_exact_at(&mut header, r.offset - HEADER).is_ok()
            && file.read_exact_at(&mut body, r.offset).is_ok();
        let valid = ok
            && &header[..4] == MAGIC
            && header[4..8] == r.len.to_le_bytes()
            && header[8..12] == r.crc.to_le_bytes()
            && crc32fast::hash(&body) == r.crc;
        Ok(valid.then_some(body))
    }

    /// Counts a body found in the store at open.
    pub(crate) fn retain(&self, r: &BodyRef) {
        *self.lock().live.entry(r.segment).or_insert(0) += 1;
    }

    /// Drops a body; its segment goes when it was the last one.
    pub(crate) fn release(&self, r: &BodyRef) {
        let mut inner = self.lock();
        let active = inner.active.as_ref().map(|a| a.segment);
        let remaining = match inner.live.get_mut(&r.segment) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if remaining == 0 && active != Some(r.segment) {
            inner.live.remove(&r.segment);
            let _ = std::fs::remove_file(self.path(r.segment));
        }
    }

    /// At open, after [`BodyLog::retain`] for every stored body: deletes the
    /// segments no message refers to.
    pub(crate) fn remove_unreferenced(&self) -> Result<()> {
        let inner = self.lock();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io("cannot list", &self.dir, e))? {
            let path = entry.map_err(|e| io("cannot list", &self.dir, e))?.path();
            if let Some(n) = segment_number(&path)
                && inner.live.get(&n).copied().unwrap_or(0) == 0
                && inner.active.as_ref().map(|a| a.segment) != Some(n)
            {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_release() {
        let dir = tempfile::tempdir().unwrap();
        let log = BodyLog::open(dir.path()).unwrap();
        let a = log.append(b"first body").unwrap();
        let b = log.append(b"").unwrap();
        log.sync().unwrap();
        assert_eq!(log.read(&a).unwrap().as_deref(), Some(&b"first body"[..]));
        assert_eq!(log.read(&b).unwrap().as_deref(), Some(&b""[..]));
        // A damaged reference is not a body.
        let bad = BodyRef {
            crc: a.crc ^ 1,
            ..a
        };
        assert_eq!(log.read(&bad).unwrap(), None);
        let cut = BodyRef {
            len: a.len + 100,
            ..a
        };
        assert_eq!(log.read(&cut).unwrap(), None);
        log.release(&a);
        log.release(&b);
        // The active segment stays until a new one starts.
        assert!(log.path(a.segment).exists());
    }

    #[test]
    fn reopen_starts_a_new_segment_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, dropped) = {
            let log = BodyLog::open(dir.path()).unwrap();
            let kept = log.append(b"kept").unwrap();
            log.sync().unwrap();
            let log2 = BodyLog::open(dir.path()).unwrap();
            let dropped = log2.append(b"dropped").unwrap();
            log2.sync().unwrap();
            (kept, dropped)
        };
        assert_ne!(kept.segment, dropped.segment);
        let log = BodyLog::open(dir.path()).unwrap();
        log.retain(&kept);
        log.remove_unreferenced().unwrap();
        assert_eq!(log.read(&kept).unwrap().as_deref(), Some(&b"kept"[..]));
        assert_eq!(
            log.read(&dropped).unwrap(),
            None,
            "unreferenced segment removed"
        );
        let next = log.append(b"new").unwrap();
        assert!(next.segment > dropped.segment);
    }
}
