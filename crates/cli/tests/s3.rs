#![cfg(feature = "s3")]
//! `pagewire image push` and `serve --source s3://` against a real
//! S3-compatible server on loopback (`moto_server`, started here): every
//! byte a VM reads is checked against the memory file, cold (fetched) and
//! warm (from the disk cache, in a new server process). Needs userfaultfd
//! and `moto_server` (pip install 'moto[server]'); skips with a message
//! without them, unless PAGEWIRE_REQUIRE_KVM=1 (CI), where a skip fails.

use std::process::Command;

mod common;
use common::have_uffd;
use common::server::*;
use store::testing::{unique_bucket, MotoServer};

#[test]
fn an_image_in_s3_serves_every_byte_cold_and_warm() {
    if !have_uffd() {
        return;
    }
    let Some(moto) = MotoServer::start() else {
        return;
    };
    let bucket = unique_bucket("cli");
    moto.create_bucket(&bucket);
    let env = moto.env();
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 8 * MIB);
    let img = dir.path().join("snap.pwimg");
    let out = Command::new(BIN)
        .args(["image", "pack"])
        .arg(&mem)
        .arg("-o")
        .arg(&img)
        .output()
        .expect("pack");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["image", "push"])
        .arg(&img)
        .arg(format!("s3://{bucket}/images"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("push");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("s3://{bucket}/images/snap.pwimg");
    let cache = dir.path().join("cache");
    let cache_arg = cache.to_str().expect("utf-8").to_string();
    for (round, what) in ["cold", "warm"].iter().enumerate() {
        let sub = dir.path().join(what);
        std::fs::create_dir_all(&sub).expect("mkdir");
        let server = Server::start_source_env(
            &sub,
            &url,
            &["--cache-dir", &cache_arg, "--exit-after", "1"],
            &env,
        );
        let r = run_ok(&server, &mem, &["--threads", "2", "--order", "random"]);
        assert_eq!(r["pages_touched"], r["pages_total"], "{what}: {r}");
        let stats = server.wait_stats(1);
        let st = &stats[0]["stats"];
        assert_eq!(st["pages_poisoned"], 0, "{what}: {st}");
        if round == 0 {
            assert!(
                st["source_waits"].as_u64().unwrap_or(0) > 0,
                "a cold cache must make faults wait for fetches: {st}"
            );
        } else {
            assert_eq!(
                st["source_waits"].as_u64(),
                Some(0),
                "a warm disk cache must serve without fetching: {st}"
            );
        }
    }
    // A missing object: a clear error before any VM waits.
    let sock = dir.path().join("never.sock");
    let out = Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(&sock)
        .args(["--source", &format!("s3://{bucket}/images/nope.pwimg")])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !sock.exists(), "{err}");
    assert!(err.contains("nope.pwimg"), "{err}");
}
