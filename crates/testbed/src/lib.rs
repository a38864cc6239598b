//! What pagewire's harnesses share: the Firecracker client (`fc-client`),
//! the access-path probes (`probe`), the bench (`bench`) and the binary's
//! `demo` and `vm` commands.
//!
//! - [`Error`], [`Context`], [`bail!`] and [`ensure!`]: the harnesses' typed
//!   error, whose message says what failed, with the cause chained;
//! - [`parse_size`] and [`parse_size_2m`]: sizes as the command line writes
//!   them (`256M`, `0x1000`);
//! - [`TempDir`]: a scratch directory removed on drop;
//! - [`generate`]: a memory file of pseudo-random pages, some zero;
//! - [`Mapping`]: anonymous private memory, unmapped on drop;
//! - [`wait_listening`]: waiting for a handler process to listen;
//! - [`find_recording`]: the working set `serve --record` wrote.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

#[macro_use]
mod error;

pub use error::{chain, Context, Error, Result};

/// A size that must be a positive multiple of 2 MiB (memory files, guests).
pub fn parse_size_2m(s: &str) -> std::result::Result<u64, String> {
    let bytes = parse_size(s)?;
    if bytes == 0 || !bytes.is_multiple_of(2 << 20) {
        return Err(format!(
            "{s:?}: the size must be a positive multiple of 2 MiB"
        ));
    }
    Ok(bytes)
}

/// A size in bytes: decimal or `0x` hex, with an optional K, M or G suffix
/// (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse::<u64>(),
    }
    .map_err(|e| format!("{s:?} is not a size: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `pagewire-bench.PID` in the system's temporary directory.
    pub fn new() -> Result<TempDir> {
        TempDir::named("bench")
    }

    /// `pagewire-WHAT.PID` in the system's temporary directory.
    pub fn named(what: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("pagewire-{what}.{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fills `path` with `size` bytes of pseudo-random pages, every
/// `zero_every`th page zero.
pub fn generate(path: &Path, size: u64, zero_every: usize) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut page = vec![0u8; 4096];
    let writing = || format!("writing {}", path.display());
    for i in 0..size / 4096 {
        if zero_every > 0 && i as usize % zero_every == zero_every - 1 {
            page.fill(0);
        } else {
            for w in page.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_ne_bytes());
            }
        }
        f.write_all(&page).with_context(writing)?;
    }
    f.flush().with_context(writing)?;
    Ok(())
}

/// Fills `path` with `size` bytes of compressible pages, like a guest's
/// heap and page cache rather than noise: per page, records of 64 bytes (a
/// counter, a small-valued field, a pointer-like word, a run of text), with
/// one page in 8 random and every `zero_every`th page zero. lz4 packs it
/// about 3x, zstd about 5x.
pub fn generate_mixed(path: &Path, size: u64, zero_every: usize) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    const TEXT: &[u8] = b"GET /api/v1/items?id=0000 HTTP/1.1 Host: example ";
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut page = vec![0u8; 4096];
    let writing = || format!("writing {}", path.display());
    for i in 0..size / 4096 {
        if zero_every > 0 && i as usize % zero_every == zero_every - 1 {
            page.fill(0);
        } else if i % 8 == 5 {
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&next().to_ne_bytes());
            }
        } else {
            let base = next();
            for (k, rec) in page.chunks_exact_mut(64).enumerate() {
                rec[..8].copy_from_slice(&(i * 64 + k as u64).to_le_bytes());
                rec[8..16].copy_from_slice(&(next() % 16).to_le_bytes());
                rec[16..24].copy_from_slice(&(base + 64 * (next() % 8)).to_le_bytes());
                rec[24..64].copy_from_slice(&TEXT[..40]);
            }
        }
        f.write_all(&page).with_context(writing)?;
    }
    f.flush().with_context(writing)?;
    Ok(())
}

/// Waits until a handler started as `child` creates `socket` (20 s at
/// most); fails early if it exits first, and kills it on timeout.
pub fn wait_listening(child: &mut Child, socket: &Path, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("handler {name} exited before listening ({status})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "handler {name} did not listen on {} within 20 s",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The recording `serve --record` wrote into `dir` (the first `.pwws`
/// found).
pub fn find_recording(dir: &Path) -> Result<PathBuf> {
    let found = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "pwws"));
    found.with_context(|| format!("no working set (.pwws) in {}", dir.display()))
}

/// An anonymous private mapping, unmapped on drop. Share it with `Arc` so
/// that a hung access keeps it alive instead of faulting on freed memory.
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// `len` bytes of fresh anonymous private memory, readable and writable.
    pub fn new(len: usize) -> Result<Mapping> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a fresh anonymous mapping at an address the kernel picks
        // overlaps nothing that exists.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .with_context(|| format!("mmap of {len} bytes of anonymous memory"))?;
        Ok(Mapping {
            addr: ptr as usize,
            len,
        })
    }

    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the mapping, for system calls that take a buffer.
    /// Dereferencing it is the caller's business: the mapping may be
    /// registered with a userfaultfd, and another thread may be faulting.
    pub fn ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Copies `out.len()` bytes at `offset` out of the mapping (faulting in
    /// missing pages as an ordinary thread load).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset <= self.len && out.len() <= self.len - offset);
        // SAFETY: the range is inside the mapping, which lives as long as
        // `self`; `out` is a distinct, writable buffer. Nothing in this
        // program holds a Rust reference into the mapping; the kernel may
        // populate pages concurrently, but only atomically (UFFDIO_COPY).
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr().add(offset), out.as_mut_ptr(), out.len())
        }
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset <= self.len && data.len() <= self.len - offset);
        // SAFETY: the range is inside the mapping, which lives as long as
        // `self`; nothing else reads or writes it while this runs.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr().add(offset), data.len()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `Mapping::new` with this length
        // and no reference into it outlives `self`.
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr().cast(), self.len) } {
            tracing::debug!(error = %e, "munmap failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8K"), Ok(8 << 10));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("0x1000"), Ok(0x1000));
        assert_eq!(parse_size(" 1G "), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert_eq!(parse_size_2m("4M"), Ok(4 << 20));
        assert!(parse_size_2m("3M").is_err());
        assert!(parse_size_2m("0").is_err());
    }

    #[test]
    fn errors_chain_like_anyhow() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = Err::<(), _>(io)
            .context("opening x")
            .context("loading y")
            .expect_err("an error");
        assert!(matches!(e, Error::Step { .. }));
        let text = chain(&e);
        assert!(text.starts_with("loading y: opening x: "), "{text}");
        let e = None::<u8>.context("no value").expect_err("an error");
        assert_eq!(chain(&e), "no value");
        let e = Err::<(), _>(rustix::io::Errno::NOENT)
            .context("stat")
            .expect_err("an error");
        assert!(matches!(e, Error::Io { .. }));
    }

    #[test]
    fn temp_dir_goes_away() {
        let d = TempDir::named("testbed-unit").expect("a temporary directory");
        let p = d.path().to_path_buf();
        generate(&p.join("mem"), 3 * 4096, 3).expect("a memory file");
        let bytes = std::fs::read(p.join("mem")).expect("the memory file");
        assert_eq!(bytes.len(), 3 * 4096);
        assert!(bytes[2 * 4096..].iter().all(|&b| b == 0));
        assert!(bytes[..4096].iter().any(|&b| b != 0));
        assert!(find_recording(&p).is_err());
        drop(d);
        assert!(!p.exists());
    }
}
