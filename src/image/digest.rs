//! Content digests (`sha256:<hex>`), containerd's chain ids, and a reader that hashes and
//! counts what passes through it.

use std::{fmt, io, str::FromStr};

use sha2::{Digest as _, Sha256};

/// A validated `sha256:<64 lowercase hex digits>` digest; the only algorithm image
/// archives in the wild use, and the only one accepted.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a sha256 digest (expected \"sha256:\" and 64 lowercase hex digits)")]
pub struct BadDigest(pub String);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(data))
    }

    /// The digest a finished hasher computed.
    pub fn from_hasher(h: Sha256) -> Digest {
        Digest(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// A digest from its 64 hex digits (as in `blobs/sha256/<hex>`).
    ///
    /// # Errors
    /// When `hex` is not 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Result<Digest, BadDigest> {
        format!("sha256:{hex}").parse()
    }

    /// The full form, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The first 12 hex digits, as `docker` shows ids.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Digest, BadDigest> {
        match s.strip_prefix("sha256:") {
            Some(h)
                if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Ok(Digest(s.to_string()))
            }
            _ => Err(BadDigest(s.chars().take(100).collect())),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// containerd's chain ids of a stack of layers given by their diff ids (the digests of
/// their uncompressed tars), bottom first: `chain(L0) = diffid(L0)`, and
/// `chain(Ln) = sha256(chain(Ln-1) + " " + diffid(Ln))`. A chain id names a committed
/// snapshot holding exactly that stack, whatever archive or registry it came from.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Digest::of(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// A reader that computes the sha256 of, and counts, every byte read through it.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R> Hashing<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The digest of what was read, and how many bytes it was.
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_hasher(self.hasher), self.count)
    }
}

impl<R: io::Read> io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn parses_only_sha256() {
        assert!("sha256:".parse::<Digest>().is_err());
        assert!(format!("sha256:{}", "A".repeat(64))
            .parse::<Digest>()
            .is_err());
        assert!(format!("sha512:{}", "a".repeat(64))
            .parse::<Digest>()
            .is_err());
        assert!(format!("sha256:{}", "a".repeat(63))
            .parse::<Digest>()
            .is_err());
        let x = d('a');
        assert_eq!(x.hex(), "a".repeat(64));
        assert_eq!(x.short(), "aaaaaaaaaaaa");
        assert_eq!(Digest::from_hex(&"a".repeat(64)).unwrap(), x);
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn chain_ids_follow_containerd() {
        // Vectors computed independently with
        // printf 'sha256:aaa…a sha256:bbb…b' | sha256sum, and so on.
        let c = chain_ids(&[d('a'), d('b'), d('c')]);
        assert_eq!(c[0], d('a'), "the first chain id is the first diff id");
        assert_eq!(
            c[1].as_str(),
            "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c"
        );
        assert_eq!(
            c[2].as_str(),
            "sha256:c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588"
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn hashing_reader_counts() {
        let mut r = Hashing::new(&b"hello"[..]);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        let (dg, n) = r.finish();
        assert_eq!(n, 5);
        assert_eq!(dg, Digest::of(b"hello"));
    }
}
