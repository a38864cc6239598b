//! The bucket layout: manifests and content-addressed chunk objects (see
//! the crate's notes, "Bucket layout").

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use futures::TryStreamExt;
use image::{BlobEntry, Index, HEADER_LEN};
use object_store::{ObjectStore, ObjectStoreExt};

use crate::client::{hex, Client, Failure};
use crate::{S3Url, StoreError};

/// The folder of chunk objects under a prefix.
pub(crate) const CHUNKS: &str = "chunks";

/// The chunk object's name of a blob: `<blake3 hex of the decoded
/// bytes>.<codec name>.<xxh3 hex of the stored bytes>`. The stored bytes
/// of one content under one codec differ with the compression level and
/// the library's version: the last part keeps two such chunks apart (one
/// never overwrites the other), and the first still groups a content.
pub(crate) fn chunk_name(entry: &BlobEntry) -> String {
    format!(
        "{}.{}.{:016x}",
        hex(&entry.hash),
        entry.codec.name(),
        entry.checksum
    )
}

/// `prefix/chunks`.
pub(crate) fn chunks_prefix(prefix: &S3Url) -> Result<S3Url, StoreError> {
    prefix.join(CHUNKS)
}

/// The chunk object of a blob under `chunks` (a `prefix/chunks` URL).
pub(crate) fn chunk_url(chunks: &S3Url, entry: &BlobEntry) -> Result<S3Url, StoreError> {
    chunks.join(&chunk_name(entry))
}

/// Reads and checks the manifest at `url`: the image's header and index,
/// and nothing else (its length must be the header's `data_offset`).
pub(crate) fn read_manifest(client: &Client, url: &S3Url) -> Result<Index, StoreError> {
    let store = client.stores(url.bucket())?.fetch;
    let path = url.path();
    let what = url.to_string();
    let retry = client.retry();
    let retried = AtomicU64::new(0);
    let request = |op: String, f: Failure| match f {
        Failure::NotFound => StoreError::NoSuchObject { url: what.clone() },
        Failure::Failed(why) => StoreError::Request {
            op,
            url: what.clone(),
            why,
        },
    };
    let bytes = client.runtime().block_on(async {
        let size = retry
            .run(&retried, || store.head(&path))
            .await
            .map_err(|f| request("HEAD".to_string(), f))?
            .size;
        let get = |r: std::ops::Range<u64>| {
            let op = format!("GET bytes {}..{} of", r.start, r.end);
            let (store, path, retried) = (&store, &path, &retried);
            async move {
                retry
                    .run(retried, || store.get_range(path, r.clone()))
                    .await
                    .map_err(|f| request(op, f))
            }
        };
        let head_len = size.min(HEADER_LEN as u64);
        let first = get(0..head_len).await?;
        let needed = Index::needed(&first, &what)?;
        if size < needed {
            return Err(StoreError::Image(image::ImageError::Truncated {
                what: what.clone(),
                why: format!(
                    "the manifest has {size} bytes, its header and index need {needed}: push the image again"
                ),
            }));
        }
        if size > needed {
            return Err(StoreError::Image(image::ImageError::BadHeader {
                what: what.clone(),
                why: format!(
                    "not a manifest: {size} bytes, its header and index end at {needed} (an image \
                     file copied whole? upload images with `pagewire image push`)"
                ),
            }));
        }
        let mut bytes = first.to_vec();
        if needed > head_len {
            bytes.extend_from_slice(&get(head_len..needed).await?);
        }
        Ok::<_, StoreError>(bytes)
    })?;
    Ok(Index::parse(&bytes, &what)?)
}

/// The chunk objects under `chunks` (a `prefix/chunks` URL): name → size.
/// One listing, paginated by object_store (1,000 keys a page).
pub(crate) fn list_chunks(
    client: &Client,
    store: &dyn ObjectStore,
    chunks: &S3Url,
) -> Result<HashMap<String, u64>, StoreError> {
    let path = chunks.path();
    client
        .runtime()
        .block_on(async {
            let mut out = HashMap::new();
            let mut stream = store.list(Some(&path));
            while let Some(meta) = stream.try_next().await? {
                // Only direct children: `prefix/chunks/NAME`.
                let parts: Vec<_> = meta
                    .location
                    .prefix_match(&path)
                    .into_iter()
                    .flatten()
                    .collect();
                if let [name] = parts.as_slice() {
                    out.insert(name.as_ref().to_string(), meta.size);
                }
            }
            Ok::<_, object_store::Error>(out)
        })
        .map_err(|e| StoreError::Request {
            op: "LIST".to_string(),
            url: format!("{chunks}/"),
            why: e.to_string(),
        })
}
