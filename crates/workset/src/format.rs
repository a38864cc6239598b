//! The `.pwws` file format, version 1 (documented in `docs/formats.md`).

use std::io::Write;
use std::path::Path;

use crate::{SnapshotId, Touch, WorkingSet, WorksetError};

/// The first 8 bytes of every working set file.
pub(crate) const MAGIC: [u8; 8] = *b"PWWSET\0\0";
/// The version this build writes and reads.
pub(crate) const VERSION: u32 = 1;
/// Header: magic, version, flags, snapshot len, fingerprint, runs, reserved, window_ms, count.
const HEADER: usize = 8 + 4 + 4 + 8 + 32 + 4 + 4 + 8 + 8;
/// One entry: page, t_us, thread, seen.
const ENTRY: usize = 24;
/// The blake3 trailer.
const TRAILER: usize = 32;

/// A little-endian reader over a slice whose length was checked beforehand.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

impl WorkingSet {
    /// The `.pwws` encoding, version 1, all little endian: magic
    /// `PWWSET\0\0`, u32 version, u32 flags (0), u64 snapshot length,
    /// 32-byte fingerprint, u32 runs, u32 reserved (0), u64 window_ms, u64
    /// count, `count` entries of {u64 page, u64 t_us, u32 thread, u32 seen},
    /// then blake3 of everything before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.touches.len() * ENTRY + TRAILER);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.snapshot.len.to_le_bytes());
        out.extend_from_slice(&self.snapshot.fingerprint);
        out.extend_from_slice(&self.runs.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.window_ms.to_le_bytes());
        out.extend_from_slice(&(self.touches.len() as u64).to_le_bytes());
        for t in &self.touches {
            out.extend_from_slice(&t.page.to_le_bytes());
            out.extend_from_slice(&t.t_us.to_le_bytes());
            out.extend_from_slice(&t.thread.to_le_bytes());
            out.extend_from_slice(&t.seen.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses and validates a `.pwws` encoding; any malformed input is an
    /// error naming what is wrong, never a panic.
    pub fn decode(data: &[u8]) -> Result<WorkingSet, WorksetError> {
        let found = data.len() as u64;
        let truncated = |what, needed: usize| WorksetError::Truncated {
            what,
            needed: needed as u64,
            found,
        };
        let prefix = data.len().min(MAGIC.len());
        if data[..prefix] != MAGIC[..prefix] {
            return Err(WorksetError::NotAWorkingSet);
        }
        if data.len() < MAGIC.len() + 4 {
            return Err(truncated("the header", HEADER + TRAILER));
        }
        let mut c = Cursor(&data[MAGIC.len()..]);
        let version = c.u32();
        if version != VERSION {
            return Err(if version > VERSION {
                WorksetError::Version { found: version }
            } else {
                WorksetError::Invalid {
                    what: format!("version {version}"),
                }
            });
        }
        if data.len() < HEADER + TRAILER {
            return Err(truncated("the header", HEADER + TRAILER));
        }
        let flags = c.u32();
        let snapshot_len = c.u64();
        let fingerprint = c.take::<32>();
        let runs = c.u32();
        let reserved = c.u32();
        let window_ms = c.u64();
        let count = c.u64();

        // Bound count by the length before computing or allocating anything from it.
        let room = (data.len() - HEADER - TRAILER) / ENTRY;
        if count > room as u64 {
            return Err(truncated(
                "its count of pages",
                (count as u128 * ENTRY as u128 + (HEADER + TRAILER) as u128)
                    .try_into()
                    .unwrap_or(usize::MAX),
            ));
        }
        let count = count as usize;
        let expected = HEADER + count * ENTRY + TRAILER;
        if data.len() != expected {
            return Err(WorksetError::Invalid {
                what: format!(
                    "{count} pages make {expected} bytes, the data has {}",
                    data.len()
                ),
            });
        }
        let (body, sum) = data.split_at(expected - TRAILER);
        if blake3::hash(body).as_bytes()[..] != sum[..] {
            return Err(WorksetError::Corrupt);
        }
        if flags != 0 {
            return Err(WorksetError::Invalid {
                what: format!("unknown flags {flags:#x}"),
            });
        }
        if reserved != 0 {
            return Err(WorksetError::Invalid {
                what: format!("reserved field is {reserved:#x}, not 0"),
            });
        }
        let mut entries = Cursor(&body[HEADER..]);
        let touches = (0..count)
            .map(|_| Touch {
                page: entries.u64(),
                t_us: entries.u64(),
                thread: entries.u32(),
                seen: entries.u32(),
            })
            .collect();
        let ws = WorkingSet {
            snapshot: SnapshotId {
                len: snapshot_len,
                fingerprint,
            },
            runs,
            window_ms,
            touches,
        };
        ws.validate()?;
        Ok(ws)
    }

    /// Reads and decodes a `.pwws` file.
    pub fn read(path: impl AsRef<Path>) -> Result<WorkingSet, WorksetError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| WorksetError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::decode(&data)
    }

    /// Validates, then writes atomically: a temporary file in the same
    /// directory, fsynced, renamed over `path`, then the directory fsynced.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), WorksetError> {
        self.validate()?;
        let path = path.as_ref();
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| WorksetError::Io { path: p, source }
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| WorksetError::Io {
            path: path.to_owned(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(&self.encode()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, path).map_err(io(path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkingSet {
        WorkingSet {
            snapshot: SnapshotId {
                len: 1000 * crate::PAGE,
                fingerprint: [7; 32],
            },
            runs: 3,
            window_ms: 5000,
            touches: (0..50u64)
                .map(|i| Touch {
                    page: (i * 37) % 1000,
                    t_us: i * 10 / 3,
                    thread: (i % 4) as u32,
                    seen: 1 + (i % 3) as u32,
                })
                .collect(),
        }
    }

    /// xorshift64*: deterministic randomness without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn seed() -> u64 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        println!("seed {seed}");
        seed
    }

    #[test]
    fn round_trip() {
        let ws = sample();
        let bytes = ws.encode();
        assert_eq!(bytes.len(), HEADER + 50 * ENTRY + TRAILER);
        assert_eq!(WorkingSet::decode(&bytes).expect("decode"), ws);
        let empty = WorkingSet {
            touches: vec![],
            ..sample()
        };
        assert_eq!(WorkingSet::decode(&empty.encode()).expect("decode"), empty);
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.pwws");
        sample().write(&path).expect("write the working set");
        sample().write(&path).expect("write the working set"); // replaces
        assert_eq!(
            WorkingSet::read(&path).expect("read the working set"),
            sample()
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("read_dir").count(),
            1,
            "no temp file left"
        );
        let missing = WorkingSet::read(dir.path().join("missing.pwws")).unwrap_err();
        assert!(missing.to_string().contains("missing.pwws"), "{missing}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            match WorkingSet::decode(&bytes[..n]) {
                Err(WorksetError::Truncated { .. }) => {}
                other => panic!("truncated to {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn random_corruptions_are_errors() {
        let mut rng = Rng(seed());
        let bytes = sample().encode();
        for _ in 0..2000 {
            let mut bad = bytes.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() % bad.len() as u64) as usize;
                bad[i] ^= 1 << (rng.next() % 8);
            }
            if bad != bytes {
                assert!(WorkingSet::decode(&bad).is_err());
            }
        }
    }

    #[test]
    fn random_bytes_do_not_panic() {
        let mut rng = Rng(seed());
        for _ in 0..2000 {
            let len = (rng.next() % 400) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if rng.next() & 1 == 0 && len >= 12 {
                data[..8].copy_from_slice(&MAGIC);
                data[8..12].copy_from_slice(&VERSION.to_le_bytes());
            }
            let _ = WorkingSet::decode(&data);
        }
    }

    /// Re-encodes with a fixed checksum so the semantic checks are reached.
    fn resealed(mut bytes: Vec<u8>, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let body = bytes.len() - TRAILER;
        edit(&mut bytes[..body]);
        let sum = blake3::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(sum.as_bytes());
        bytes
    }

    #[test]
    fn typed_errors() {
        let good = sample().encode();
        let decode = WorkingSet::decode;
        assert!(matches!(
            decode(b"ELF\x7f...."),
            Err(WorksetError::NotAWorkingSet)
        ));
        let v2 = resealed(good.clone(), |b| b[8] = 2);
        let err = decode(&v2).unwrap_err();
        assert!(matches!(err, WorksetError::Version { found: 2 }));
        assert_eq!(
            err.to_string(),
            "written by a newer pagewire: version 2, this one reads 1"
        );
        let mut flipped = good.clone();
        flipped[HEADER + 3] ^= 0x10;
        assert!(matches!(decode(&flipped), Err(WorksetError::Corrupt)));
        let flags = resealed(good.clone(), |b| b[12] = 1);
        assert!(matches!(decode(&flags), Err(WorksetError::Invalid { .. })));
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; ENTRY]);
        assert!(matches!(decode(&longer), Err(WorksetError::Invalid { .. })));
        let huge = resealed(good.clone(), |b| {
            b[72..80].copy_from_slice(&u64::MAX.to_le_bytes())
        });
        assert!(matches!(decode(&huge), Err(WorksetError::Truncated { .. })));

        let invalid = |ws: WorkingSet, what: &str| {
            let bytes = ws.encode();
            match decode(&bytes) {
                Err(WorksetError::Invalid { what: w }) => assert!(w.contains(what), "{w}"),
                other => panic!("{what}: {other:?}"),
            }
        };
        let mut ws = sample();
        ws.touches[5].page = ws.touches[2].page;
        invalid(ws, "appears twice");
        let mut ws = sample();
        ws.touches[5].page = 1000;
        invalid(ws, "past the snapshot");
        let mut ws = sample();
        ws.touches[5].t_us = 1_000_000;
        invalid(ws, "before the previous");
        let mut ws = sample();
        ws.touches[5].seen = 4;
        invalid(ws, "seen in 4 runs of 3");
        let mut ws = sample();
        ws.runs = 0;
        invalid(ws, "runs is 0");
    }
}
