//! `s3://BUCKET/KEY` addresses.

use std::fmt;
use std::str::FromStr;

use object_store::path::Path;

use crate::StoreError;

/// An object (`s3://BUCKET/KEY`) or a key prefix (`s3://BUCKET/PREFIX`, or
/// `s3://BUCKET` for the bucket's root) in an S3-compatible store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Url {
    bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    key: String,
}

impl S3Url {
    /// Parses `s3://BUCKET/KEY`. The key may be empty (`s3://BUCKET`, a
    /// prefix for [`push`](crate::Client::push)); [`S3Url::object`] rejects
    /// that where an object is needed. A trailing `/` is dropped.
    pub fn parse(url: &str) -> Result<S3Url, StoreError> {
        let bad = |why: &str| StoreError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it must start with s3:// (s3://BUCKET/KEY)"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket (s3://BUCKET/KEY)"));
        }
        if bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(bad(
                "a bucket name is at most 63 letters, digits, '.', '-' or '_'",
            ));
        }
        let key = key.strip_suffix('/').unwrap_or(key);
        if !key.is_empty() {
            // object_store's own rules: no empty segment, no `.` or `..`.
            Path::parse(key).map_err(|e| bad(&format!("bad key {key:?}: {e}")))?;
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// As [`S3Url::parse`], for a URL that must name an object (a non-empty
    /// key).
    pub fn object(url: &str) -> Result<S3Url, StoreError> {
        let parsed = S3Url::parse(url)?;
        if parsed.key.is_empty() {
            return Err(StoreError::BadUrl {
                url: url.to_string(),
                why: "no key: name the object (s3://BUCKET/KEY)".to_string(),
            });
        }
        Ok(parsed)
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key (or prefix), without leading or trailing `/`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The object `name` under this prefix.
    pub fn join(&self, name: &str) -> Result<S3Url, StoreError> {
        let key = if self.key.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.key)
        };
        S3Url::object(&format!("s3://{}/{key}", self.bucket))
    }

    /// The prefix this object is in (its key up to the last `/`).
    pub fn parent(&self) -> S3Url {
        let key = match self.key.rsplit_once('/') {
            Some((dir, _)) => dir.to_string(),
            None => String::new(),
        };
        S3Url {
            bucket: self.bucket.clone(),
            key,
        }
    }

    /// The object's path in object_store's terms.
    pub(crate) fn path(&self) -> Path {
        // Checked by `parse`: a parse error cannot happen here, but the
        // empty path is the safe answer if it did.
        Path::parse(&self.key).unwrap_or_default()
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.key)
        }
    }
}

impl FromStr for S3Url {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<S3Url, StoreError> {
        S3Url::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_objects_and_prefixes() {
        let u = S3Url::parse("s3://bucket/a/b/img.pwi").unwrap();
        assert_eq!(u.bucket(), "bucket");
        assert_eq!(u.key(), "a/b/img.pwi");
        assert_eq!(u.to_string(), "s3://bucket/a/b/img.pwi");
        assert_eq!(u.parent().to_string(), "s3://bucket/a/b");
        assert_eq!(
            u.parent().join("base.pwi").unwrap().to_string(),
            "s3://bucket/a/b/base.pwi"
        );
        let root = S3Url::parse("s3://bucket/").unwrap();
        assert_eq!(root.key(), "");
        assert_eq!(root.to_string(), "s3://bucket");
        assert_eq!(root.join("x").unwrap().to_string(), "s3://bucket/x");
        assert_eq!(S3Url::parse("s3://b/p/").unwrap().key(), "p");
        assert_eq!(
            "s3://b/k".parse::<S3Url>().unwrap(),
            S3Url::parse("s3://b/k").unwrap()
        );
        assert_eq!(
            S3Url::object("s3://b/x").unwrap().parent(),
            S3Url::parse("s3://b").unwrap()
        );
    }

    #[test]
    fn rejects_with_clear_errors() {
        for (url, says) in [
            ("http://b/k", "must start with s3://"),
            ("s3://", "no bucket"),
            ("s3:///k", "no bucket"),
            ("s3://b b/k", "bucket name"),
            ("s3://b/a//c", "bad key"),
            ("s3://b/a/../c", "bad key"),
        ] {
            let e = S3Url::parse(url).expect_err(url).to_string();
            assert!(e.contains(says) && e.contains(url), "{url}: {e}");
        }
        let e = S3Url::object("s3://b").expect_err("no key").to_string();
        assert!(e.contains("no key"), "{e}");
    }
}
