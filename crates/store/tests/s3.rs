//! The store against a real S3-compatible server (moto_server).

use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStoreExt, PutPayload};
use store::testing::{unique_bucket, MotoServer, Rng};
use store::{Client, S3Options, S3Source, S3Url, StoreConfig, StoreError};

/// A server, a fresh bucket on it and a client.
struct Env {
    server: Arc<MotoServer>,
    bucket: String,
    client: Client,
}

impl Env {
    fn new(config: StoreConfig) -> Option<Env> {
        let server = MotoServer::shared()?;
        let bucket = unique_bucket("pw");
        server.create_bucket(&bucket);
        let client = Client::new(&server.options(), config).expect("client");
        Some(Env {
            server,
            bucket,
            client,
        })
    }

    fn url(&self, key: &str) -> S3Url {
        S3Url::parse(&format!("s3://{}/{key}", self.bucket)).expect("url")
    }

    fn get(&self, key: &str) -> Vec<u8> {
        let store = self.client.object_store(&self.bucket).expect("store");
        let path = object_store::path::Path::parse(key).expect("path");
        self.client
            .block_on(async move { store.get(&path).await?.bytes().await })
            .expect("get")
            .to_vec()
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        let store = self.client.object_store(&self.bucket).expect("store");
        let path = object_store::path::Path::parse(key).expect("path");
        self.client
            .block_on(async move { store.put(&path, PutPayload::from(bytes)).await })
            .expect("put");
    }
}

fn quick() -> StoreConfig {
    StoreConfig {
        timeout: Duration::from_secs(5),
        retries: 1,
        ..StoreConfig::default()
    }
}

#[test]
fn put_file_streams_a_large_file_in_parts() {
    let Some(env) = Env::new(quick()) else { return };
    let mut rng = Rng::new("put_file_streams_a_large_file_in_parts");
    let tmp = tempfile::tempdir().unwrap();
    // Past one 8 MiB part: a multipart upload of three parts.
    let len = (8 << 20) * 2 + 1 + rng.below(1 << 20) as usize;
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    let path = tmp.path().join("big");
    std::fs::write(&path, &data).unwrap();
    let mut seen = Vec::new();
    let n = env
        .client
        .put_file(&path, &env.url("dir/big"), &mut |d| seen.push(d))
        .expect("upload");
    assert_eq!(n, len as u64);
    assert_eq!(seen.last().copied(), Some(len as u64));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(
        env.get("dir/big") == data,
        "the object differs from the file"
    );
    // A small one: one PUT.
    std::fs::write(&path, b"small").unwrap();
    env.client
        .put_file(&path, &env.url("small"), &mut |_| {})
        .expect("upload");
    assert_eq!(env.get("small"), b"small");
    drop(env.server);
}

#[test]
fn open_errors_are_clear() {
    let Some(env) = Env::new(quick()) else { return };
    let e = env
        .client
        .open(&env.url("nothing/here"))
        .expect_err("missing");
    assert!(matches!(e, StoreError::NoSuchObject { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("no such object s3://{}/nothing/here", env.bucket)),
        "{msg}"
    );
    let e = env
        .client
        .open(&S3Url::parse("s3://no-such-bucket-pw/x").unwrap())
        .expect_err("missing bucket");
    assert!(e.to_string().contains("s3://no-such-bucket-pw/x"), "{e}");
}

#[test]
fn no_endpoint_or_region_says_what_to_set() {
    let e = Client::new(&S3Options::default(), StoreConfig::default()).expect_err("no endpoint");
    assert!(matches!(e, StoreError::NoEndpoint));
    assert!(e.to_string().contains("set AWS_ENDPOINT_URL"), "{e}");
    let e = Client::new(
        &S3Options {
            region: Some("us-east-1".into()),
            ..S3Options::default()
        },
        StoreConfig {
            fetch_concurrency: 0,
            ..StoreConfig::default()
        },
    )
    .expect_err("bad config");
    assert!(e.to_string().contains("fetch_concurrency"), "{e}");
}

#[test]
fn a_stopped_server_is_a_clear_error_after_retries() {
    let Some(mut server) = MotoServer::start() else {
        return;
    };
    let options = server.options();
    server.stop();
    let client = Client::new(
        &options,
        StoreConfig {
            timeout: Duration::from_secs(2),
            retries: 2,
            ..StoreConfig::default()
        },
    )
    .expect("client");
    let url = S3Url::parse("s3://b/img").unwrap();
    let e = client.open(&url).expect_err("stopped");
    let msg = e.to_string();
    assert!(
        matches!(e, StoreError::Request { .. })
            && msg.contains("s3://b/img")
            && msg.contains("after 3 attempts"),
        "{msg}"
    );
}
