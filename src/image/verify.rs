//! Checking the layer blobs an import needs against their digests before anything is
//! created, several blobs at once (one thread per CPU): hashing is what the check costs.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use super::{
    archive::{Archive, Layer},
    error::{Error, Result},
    Progress,
};

/// Most threads hashing blobs at once.
const MAX_THREADS: usize = 8;
/// How often the calling thread reports progress and checks for cancellation.
const TICK: Duration = Duration::from_millis(100);

/// Checks every blob of `layers` against its digest ([`Archive::verify`]), on up to one
/// thread per CPU, reporting the bytes read to `progress` (from the calling thread). Blobs
/// are started in order and each is checked to its end; once one fails or `progress` is
/// cancelled (checked before the first and then every 100 ms), no more are started.
///
/// # Errors
/// The error of the first blob (in the order of `layers`) that fails, so the same one as
/// checking them one by one would give; [`Error::Interrupted`] when cancelled before every
/// blob was checked.
pub fn verify_blobs(
    archive: &Archive,
    layers: &[&Layer],
    progress: &mut dyn Progress,
) -> Result<()> {
    if progress.cancelled() {
        return Err(Error::Interrupted);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(layers.len())
        .min(MAX_THREADS);
    let next = AtomicUsize::new(0);
    let read = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut results: Vec<Option<Result<()>>> = layers.iter().map(|_| None).collect();
    let mut cancelled = false;
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, Result<()>)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, read, stop) = (&next, &read, &stop);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(layer) = layers.get(i) else { break };
                    let r = archive.verify(layer, &mut |n| {
                        read.fetch_add(n, Ordering::Relaxed);
                    });
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if tx.send((i, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut reported = 0;
        loop {
            let got = rx.recv_timeout(TICK);
            let now = read.load(Ordering::Relaxed);
            if now > reported {
                progress.advance(now - reported);
                reported = now;
            }
            if !cancelled && progress.cancelled() {
                cancelled = true;
                stop.store(true, Ordering::Relaxed);
            }
            match got {
                Ok((i, r)) => results[i] = Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    for r in results {
        match r {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            // Not started: stopped by cancellation (a failure stops only later blobs).
            None => return Err(Error::Interrupted),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{archive::Image, digest::Digest};
    use serde_json::json;
    use std::io::Write;

    /// An OCI archive of `n` one-file layers; the layers in `corrupt` have a byte flipped
    /// after their digest was taken.
    fn image(n: usize, corrupt: &[usize]) -> (tempfile::TempDir, Archive, Image) {
        let mut files: Vec<(String, Vec<u8>)> = vec![(
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        )];
        let blob = |files: &mut Vec<(String, Vec<u8>)>, data: Vec<u8>, bad: bool| {
            let d = Digest::of(&data);
            let mut stored = data.clone();
            if bad {
                stored[100] ^= 1;
            }
            files.push((format!("blobs/sha256/{}", d.hex()), stored));
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": d.as_str(), "size": data.len()})
        };
        let (mut layers, mut diffs) = (vec![], vec![]);
        for i in 0..n {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            let data = vec![i as u8 + 1; 200_000];
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
            let t = b.into_inner().unwrap();
            diffs.push(Digest::of(&t).to_string());
            layers.push(blob(&mut files, t, corrupt.contains(&i)));
        }
        let config = json!({"rootfs": {"type": "layers", "diff_ids": diffs}});
        let c = blob(&mut files, serde_json::to_vec(&config).unwrap(), false);
        let m = json!({"schemaVersion": 2, "config": c, "layers": layers});
        let mut m = blob(&mut files, serde_json::to_vec(&m).unwrap(), false);
        m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
        files.push((
            "index.json".into(),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).unwrap(),
        ));
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("image.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
        for (name, data) in &files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
        let a = Archive::open(&p).unwrap();
        let img = a.image(None).unwrap();
        (d, a, img)
    }

    struct Counted {
        bytes: u64,
        cancel: bool,
    }

    impl Progress for Counted {
        fn advance(&mut self, bytes: u64) {
            self.bytes += bytes;
        }
        fn cancelled(&self) -> bool {
            self.cancel
        }
    }

    fn run(a: &Archive, img: &Image, cancel: bool) -> (Result<()>, u64) {
        let layers: Vec<&Layer> = img.layers.iter().collect();
        let mut p = Counted { bytes: 0, cancel };
        let r = verify_blobs(a, &layers, &mut p);
        (r, p.bytes)
    }

    #[test]
    fn every_blob_is_checked_and_every_byte_reported() {
        let (_d, a, img) = image(5, &[]);
        let (r, bytes) = run(&a, &img, false);
        r.unwrap();
        assert_eq!(bytes, img.layers.iter().map(|l| l.size).sum::<u64>());
    }

    #[test]
    fn the_first_bad_blob_in_layer_order_is_reported() {
        let (_d, a, img) = image(5, &[2, 4]);
        for _ in 0..5 {
            let e = run(&a, &img, false).0.unwrap_err();
            assert!(matches!(e, Error::Integrity { .. }), "{e}");
            let bad = &img.layers[2].entry;
            assert!(e.to_string().contains(bad.as_str()), "{bad}: {e}");
        }
    }

    #[test]
    fn cancelling_stops_before_the_remaining_blobs() {
        let (_d, a, img) = image(20, &[]);
        let e = run(&a, &img, true).0.unwrap_err();
        assert!(matches!(e, Error::Interrupted), "{e}");
    }
}
