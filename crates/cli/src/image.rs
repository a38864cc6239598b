//! `pagewire image`: pack a memory file into a pagewire image, look into
//! one, check it, unpack it, push it to object storage
//! (`docs/image-format.md`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Pack a memory file (Firecracker Full or Diff, or `pagewire vm
    /// snapshot`'s) into an image: chunks compressed, zero pages elided,
    /// identical chunks stored once, pages equal to a base image's referred
    /// to.
    Pack(PackArgs),
    /// Sizes, compression ratio, zero and duplicate share, what comes from
    /// the base.
    Inspect(InspectArgs),
    /// Decode every chunk and check both checksums; lists every bad chunk.
    Verify(VerifyArgs),
    /// Write the memory file back out, byte for byte.
    Unpack(UnpackArgs),
    /// Upload an image (and its base, unless the same one is there) to
    /// S3-compatible object storage: `s3://BUCKET/PREFIX`.
    Push(PushArgs),
    /// GET every chunk of an image in object storage, N at once, and say
    /// how fast: the store's own speed (`bench`'s s3-get baseline).
    #[command(name = "get-loop", hide = true)]
    GetLoop(GetLoopArgs),
}

#[derive(clap::Args, Debug)]
pub struct GetLoopArgs {
    /// `s3://BUCKET/KEY` of the image.
    pub url: String,
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct PackArgs {
    /// The memory file.
    pub mem_file: PathBuf,
    /// The image to write (whole or not at all).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Pack against this base image: pages equal to its pages at the same
    /// offset, and chunks equal to its chunks, are not stored again.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// The memory file is a Firecracker Diff snapshot taken after `--base`:
    /// its holes are pages that did not change, not zero pages.
    #[arg(long, requires = "base")]
    pub diff: bool,
    /// lz4 (fast to serve), zstd (smaller, for cold images) or none.
    #[arg(long, default_value = "lz4")]
    pub codec: Codec,
    /// zstd's level.
    #[arg(long, default_value_t = 3)]
    pub level: i32,
    /// Bytes per chunk (the unit of random access, of fetches from object
    /// storage and of deduplication): a power of two, 4K to 4M.
    #[arg(long, default_value_t = image::DEFAULT_CHUNK_SIZE as u64, value_parser = testbed::parse_size)]
    pub chunk: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Codec {
    Lz4,
    Zstd,
    None,
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    pub image: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    pub image: PathBuf,
    #[arg(long)]
    pub base: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct UnpackArgs {
    pub image: PathBuf,
    /// The memory file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long)]
    pub base: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    pub image: PathBuf,
    /// `s3://BUCKET/PREFIX`: the image goes to PREFIX/<its file name>.
    pub url: String,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Pack(a) => pack(&a),
        ImageCommand::Inspect(a) => {
            let i = image::inspect(&a.image)
                .with_context(|| format!("inspecting {}", a.image.display()))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print_inspection(&a.image, &i);
            }
            Ok(())
        }
        ImageCommand::Verify(a) => {
            let len = std::fs::metadata(&a.image)
                .with_context(|| format!("reading {}", a.image.display()))?
                .len();
            let bar = Bar::new(len, "verifying");
            let r = image::verify(&a.image, a.base.as_deref(), &mut |d| bar.set(d))
                .with_context(|| format!("verifying {}", a.image.display()));
            bar.finish();
            let r = r?;
            if r.corrupt.is_empty() {
                println!("{}: {} chunks, all good", a.image.display(), r.blobs);
                return Ok(());
            }
            for (blob, why) in &r.corrupt {
                eprintln!("chunk {blob}: {why}");
            }
            bail!(
                "{}: {} of {} chunks are corrupt: their pages would be poisoned when served \
                 (repack from the memory file, or copy the image again)",
                a.image.display(),
                r.corrupt.len(),
                r.blobs
            )
        }
        ImageCommand::Unpack(a) => {
            let bar = Bar::new(0, "unpacking");
            let r = image::unpack(&a.image, a.base.as_deref(), &a.output, &mut |d| bar.set(d))
                .with_context(|| format!("unpacking {}", a.image.display()));
            bar.finish();
            let n = r?;
            println!("{}: {} bytes", a.output.display(), n);
            Ok(())
        }
        ImageCommand::Push(a) => push(&a),
        ImageCommand::GetLoop(a) => get_loop(&a),
    }
}

fn pack(a: &PackArgs) -> anyhow::Result<()> {
    let chunk = u32::try_from(a.chunk).context("--chunk is too large")?;
    let options = image::PackOptions {
        codec: match a.codec {
            Codec::Lz4 => image::Codec::Lz4,
            Codec::Zstd => image::Codec::Zstd,
            Codec::None => image::Codec::None,
        },
        level: a.level,
        chunk_size: chunk,
        base: a.base.clone(),
        diff: a.diff,
    };
    let len = std::fs::metadata(&a.mem_file)
        .with_context(|| format!("reading {}", a.mem_file.display()))?
        .len();
    let bar = Bar::new(len, "packing");
    let r = image::pack(&a.mem_file, &a.output, &options, &mut |d| bar.set(d))
        .with_context(|| format!("packing {}", a.mem_file.display()));
    bar.finish();
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{}: {} MiB of memory in {:.1} MiB ({:.2}x), {:.0} MiB/s; {} zero pages, {} from the \
         base, {} chunks stored ({} duplicates, {} in the base)",
        a.output.display(),
        r.mem_len >> 20,
        r.image_len as f64 / (1 << 20) as f64,
        r.mem_len as f64 / r.image_len.max(1) as f64,
        r.mem_len as f64 / (1 << 20) as f64 / r.seconds.max(1e-9),
        r.zero_pages,
        r.base_pages,
        r.blobs,
        r.dedup_blobs,
        r.base_blobs
    );
    Ok(())
}

fn print_inspection(path: &Path, i: &image::Inspection) {
    let pages = (i.mem_len / 4096).max(1) as f64;
    let pct = |n: u64| 100.0 * n as f64 / pages;
    println!("{} (format version {})", path.display(), i.version);
    println!("  id            {}", i.id);
    if let (Some(id), Some(name)) = (&i.base_id, &i.base_name) {
        println!("  base          {name} ({id})");
    }
    println!(
        "  memory        {} MiB in chunks of {} KiB, {}",
        i.mem_len >> 20,
        i.chunk_size >> 10,
        i.codec
    );
    println!(
        "  image         {:.1} MiB: {:.2}x smaller",
        i.image_len as f64 / (1 << 20) as f64,
        i.ratio
    );
    println!(
        "  pages         {:.1}% zero (elided), {:.1}% from the base, {:.1}% stored here",
        pct(i.zero_pages),
        pct(i.base_pages),
        pct(i.own_pages)
    );
    println!(
        "  chunks        {} stored, {} chunk slots share another's, {} stored in the base",
        i.blobs, i.duplicate_slots, i.base_blobs
    );
}

#[cfg(feature = "s3")]
fn push(a: &PushArgs) -> anyhow::Result<()> {
    let len = std::fs::metadata(&a.image)
        .with_context(|| format!("reading {}", a.image.display()))?
        .len();
    let started = Instant::now();
    let bar = Bar::new(len, "pushing");
    let dest = store::S3Url::parse(&a.url)?;
    let r = store::push(&a.image, &dest, &mut |d| bar.set(d))
        .with_context(|| format!("pushing {} to {}", a.image.display(), a.url));
    bar.finish();
    let r = r?;
    println!(
        "{} in {:.1} s: {}",
        a.url,
        started.elapsed().as_secs_f64(),
        serde_json::to_string(&r)?
    );
    Ok(())
}

#[cfg(feature = "s3")]
fn get_loop(a: &GetLoopArgs) -> anyhow::Result<()> {
    let url = store::S3Url::object(&a.url)?;
    let r = store::get_loop(&url, a.concurrency.max(1))
        .with_context(|| format!("GETting the chunks of {}", a.url))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{}: {}", a.url, serde_json::to_string(&r)?);
    }
    Ok(())
}

#[cfg(not(feature = "s3"))]
fn get_loop(a: &GetLoopArgs) -> anyhow::Result<()> {
    bail!(
        "{}: this pagewire was built without S3 support (cargo feature `s3`)",
        a.url
    )
}

#[cfg(not(feature = "s3"))]
fn push(a: &PushArgs) -> anyhow::Result<()> {
    let _ = Instant::now();
    bail!(
        "{}: this pagewire was built without S3 support (cargo feature `s3`)",
        a.url
    )
}

/// A progress bar on standard error, when it is a terminal (and a quiet
/// nothing otherwise, so that logs and CI output stay clean).
pub(crate) struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    pub(crate) fn new(len: u64, what: &str) -> Bar {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let b = indicatif::ProgressBar::new(len);
        let style = if len > 0 {
            indicatif::ProgressStyle::with_template(
                "{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
        } else {
            indicatif::ProgressStyle::with_template("{msg:10} {bytes} {bytes_per_sec}")
        };
        if let Ok(s) = style {
            b.set_style(s.progress_chars("=> "));
        }
        b.set_message(what.to_string());
        Bar(Some(b))
    }

    pub(crate) fn set(&self, done: u64) {
        if let Some(b) = &self.0 {
            b.set_position(done);
        }
    }

    pub(crate) fn message(&self, m: &str) {
        if let Some(b) = &self.0 {
            b.set_message(m.to_string());
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
