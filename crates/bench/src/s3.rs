//! The `s3-*` handlers: `serve --source s3://` against an S3-compatible
//! server — a local `moto_server` the bench starts, or the store named by
//! `--s3` with the usual AWS environment.
//!
//! - `s3-cold`: a new server process with an empty disk cache each run:
//!   every chunk is fetched.
//! - `s3-warm`: a new server process over a disk cache an untimed run
//!   filled: no fetch.
//! - `s3-get`: no VM; a plain parallel GET loop over every chunk object of
//!   the image (`pagewire image get-loop`, 16 at once): what the store
//!   itself gives, the baseline for `s3-cold`.
//! - `s3-stall`: one server, two VMs: one on a warm image (`s3-alone`,
//!   run twice alone, the second kept: memory and disk caches warm), then
//!   the same beside a VM faulting on a cold image whose every fetch is
//!   delayed by `--s3-delay-ms` (`s3-beside`, and that VM as
//!   `s3-cold<ms>`): cached faults must keep their usual p99.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::{bail, ensure, Context as _, Result};

use crate::{client_command, row_from_client, Config, Row, Via};

/// An image in the store, and how to reach it.
pub(crate) struct S3 {
    /// The AWS environment for children (empty: they inherit ours).
    env: Vec<(String, String)>,
    /// `s3://BUCKET/PREFIX`.
    prefix: String,
    /// The memory file's lz4 image, in the store.
    pub url: String,
    warm_cache: PathBuf,
    warmed: bool,
    mem_mib: f64,
    _moto: Option<store::testing::MotoServer>,
}

impl S3 {
    /// Starts `moto_server` unless `--s3` names a store, and pushes `image`.
    pub fn setup(exe: &Path, dir: &Path, args: &Config, image: &Path, mem_mib: f64) -> Result<S3> {
        let (env, prefix, moto) = match &args.s3 {
            Some(p) => (Vec::new(), p.trim_end_matches('/').to_string(), None),
            None => {
                let Some(moto) = store::testing::MotoServer::start() else {
                    bail!(
                        "the s3 handlers need an S3 server: install moto (pip install \
                         'moto[server]') or give --s3 s3://BUCKET/PREFIX with the AWS \
                         environment set"
                    );
                };
                let bucket = store::testing::unique_bucket("bench");
                moto.create_bucket(&bucket);
                let env = moto.env();
                (env, format!("s3://{bucket}/bench"), Some(moto))
            }
        };
        let mut s3 = S3 {
            env,
            prefix,
            url: String::new(),
            warm_cache: dir.join("s3-cache-warm"),
            warmed: false,
            mem_mib,
            _moto: moto,
        };
        s3.url = s3.push(exe, image)?;
        Ok(s3)
    }

    /// Pushes `image`; returns its URL.
    fn push(&self, exe: &Path, image: &Path) -> Result<String> {
        let o = Command::new(exe)
            .args(["image", "push"])
            .arg(image)
            .arg(&self.prefix)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .context("running image push")?;
        ensure!(
            o.status.success(),
            "image push failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let name = image
            .file_name()
            .and_then(|n| n.to_str())
            .context("the image's file name")?;
        Ok(format!("{}/{name}", self.prefix))
    }

    fn via<'a>(&'a self, url: &'a str, extra: &'a [String]) -> Via<'a> {
        Via {
            source: Some(url),
            env: &self.env,
            extra,
        }
    }

    /// A run with an empty disk cache of its own.
    pub fn cold(
        &self,
        exe: &Path,
        dir: &Path,
        mem: &Path,
        args: &Config,
        run: usize,
    ) -> Result<Row> {
        let cache = dir.join(format!("s3-cache-cold-{run}"));
        let _ = std::fs::remove_dir_all(&cache);
        let extra = cache_flags(&cache);
        let row = self
            .via(&self.url, &extra)
            .run(exe, dir, mem, args, "s3-cold");
        let _ = std::fs::remove_dir_all(&cache);
        row
    }

    /// A run over the warm disk cache (filled by an untimed run first).
    pub fn warm(&mut self, exe: &Path, dir: &Path, mem: &Path, args: &Config) -> Result<Row> {
        let extra = cache_flags(&self.warm_cache);
        if !self.warmed {
            let row = self
                .via(&self.url, &extra)
                .run(exe, dir, mem, args, "s3-warmup")?;
            ensure!(row.ok, "the warm-up run failed: {:?}", row.error);
            self.warmed = true;
        }
        self.via(&self.url, &extra)
            .run(exe, dir, mem, args, "s3-warm")
    }

    /// The plain parallel GET loop over the image's chunk objects.
    pub fn get_loop(&self, exe: &Path) -> Result<Row> {
        let o = Command::new(exe)
            .args([
                "image",
                "get-loop",
                &self.url,
                "--concurrency",
                "16",
                "--json",
            ])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .context("running image get-loop")?;
        ensure!(
            o.status.success(),
            "image get-loop failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let r: serde_json::Value =
            serde_json::from_slice(&o.stdout).context("get-loop's report")?;
        let secs = r["seconds"].as_f64().unwrap_or(f64::NAN);
        Ok(Row {
            handler: "s3-get".into(),
            ok: true,
            wall_ms: secs * 1000.0,
            gib_s: self.mem_mib / 1024.0 / secs,
            touched_mib: self.mem_mib,
            ..Row::default()
        })
    }

    /// `s3-stall`: a warm VM alone, then beside a cold one whose fetches
    /// are each delayed by `delay_ms`.
    pub fn stall(
        &mut self,
        exe: &Path,
        dir: &Path,
        mem: &Path,
        args: &Config,
        run: usize,
    ) -> Result<Vec<Row>> {
        // Warm the disk cache for the warm image first.
        if !self.warmed {
            self.warm(exe, dir, mem, args)?;
        }
        // Another image, none of whose chunks is cached: the memory file
        // with the first word of each page changed, differently each run
        // (the disk cache is shared: last run's cold image is warm now).
        let mut data = std::fs::read(mem).context("reading the memory file")?;
        let mark = (run as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for page in data.chunks_mut(4096) {
            if page.iter().any(|&b| b != 0) {
                for (b, m) in page.iter_mut().zip(mark.to_le_bytes()) {
                    *b ^= m;
                }
            }
        }
        let cold_mem = dir.join("mem-cold");
        std::fs::write(&cold_mem, &data).context("writing the cold memory file")?;
        drop(data);
        let cold_img = dir.join(format!("mem-cold-{run}.pwimg"));
        let o = Command::new(exe)
            .args(["image", "pack"])
            .arg(&cold_mem)
            .arg("-o")
            .arg(&cold_img)
            .stdin(Stdio::null())
            .output()
            .context("packing the cold image")?;
        ensure!(
            o.status.success(),
            "image pack failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let cold_url = self.push(exe, &cold_img)?;
        let snaps = dir.join("s3-stall");
        let _ = std::fs::remove_dir_all(&snaps);
        std::fs::create_dir_all(&snaps).context("creating the snapshot directory")?;
        std::fs::write(snaps.join("warm.url"), format!("{}\n", self.url)).context("warm.url")?;
        std::fs::write(snaps.join("cold.url"), format!("{cold_url}\n")).context("cold.url")?;
        // One disk cache for both: the warm image's chunks are in it, the
        // cold one's never were (other content).
        let stats = dir.join(format!("s3-stall-{run}.stats"));
        let _ = std::fs::remove_file(&stats);
        let mut server = Command::new(exe)
            .arg("serve")
            .arg("--snapshot-dir")
            .arg(&snaps)
            .arg("--socket-dir")
            .arg(&snaps)
            .args(cache_flags(&self.warm_cache))
            .args(["--threads", &args.serve_threads.to_string()])
            .args(["--cluster-pages", &args.cluster_pages.to_string()])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PAGEWIRE_S3_INJECT_DELAY_MS", args.s3_delay_ms.to_string())
            .arg("--stats-json")
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("s3-stall.log")).context("the server's log")?)
            .spawn()
            .context("starting serve")?;
        let rows = (|| -> Result<Vec<Row>> {
            let (warm_sock, cold_sock) = (snaps.join("warm.sock"), snaps.join("cold.sock"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !(warm_sock.exists() && cold_sock.exists()) {
                ensure!(
                    Instant::now() < deadline,
                    "serve did not listen on both sockets"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let warm = |name: &str| -> Result<Row> {
                let out = client_command(exe, mem, args)
                    .arg("--socket")
                    .arg(&warm_sock)
                    .output()
                    .context("running the warm client")?;
                row_from_client(name, &out)
            };
            let _first = warm("s3-alone")?;
            let alone = warm("s3-alone")?;
            // A fault per client thread (one by default): a fetch of
            // --s3-delay-ms and more in flight at a time per thread, all
            // the while the warm VM runs.
            let mut cold = client_command(exe, &cold_mem, args)
                .args(["--timeout-s", "600"])
                .arg("--socket")
                .arg(&cold_sock)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the cold client")?;
            std::thread::sleep(Duration::from_millis(200));
            let beside = warm("s3-beside");
            // Its job is done: it was waiting on fetches throughout.
            let _ = cold.kill();
            let _ = cold.wait();
            // What the cold VM did meanwhile, from the server's line for it.
            let deadline = Instant::now() + Duration::from_secs(10);
            let line = loop {
                let text = std::fs::read_to_string(&stats).unwrap_or_default();
                // Whole lines only: one being written may be read cut short.
                let whole = text.rfind('\n').map_or("", |i| &text[..i]);
                if let Some(l) = whole.lines().find(|l| l.contains("\"cold\"")) {
                    break serde_json::from_str::<serde_json::Value>(l).ok();
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let st = line.as_ref().map(|l| &l["stats"]);
            let cold_faults = st.and_then(|s| s["faults"].as_u64()).unwrap_or(0);
            let cold_row = Row {
                handler: format!("s3-cold{}", args.s3_delay_ms),
                // The measurement holds only if the cold VM was faulting
                // (waiting on fetches) while the warm one ran.
                ok: cold_faults > 0,
                faults: st.and_then(|s| s["faults"].as_u64()),
                pages_copied: st.and_then(|s| s["pages_copied"].as_u64()),
                pages_zeroed: st.and_then(|s| s["pages_zeroed"].as_u64()),
                error: line.is_none().then(|| {
                    format!(
                        "no statistics line for the cold VM; log: {}",
                        std::fs::read_to_string(dir.join("s3-stall.log")).unwrap_or_default()
                    )
                }),
                ..Row::default()
            };
            Ok(vec![alone, beside?, cold_row])
        })();
        let _ = server.kill();
        let _ = server.wait();
        let _ = std::fs::remove_file(&cold_mem);
        rows
    }
}

fn cache_flags(dir: &Path) -> Vec<String> {
    vec!["--cache-dir".into(), dir.to_string_lossy().into_owned()]
}
