//! Pool autogrow and metrics on real dm: a writer fills a small loopback pool past its
//! low-water mark; the daemon, woken by the kernel's event (its periodic check is set far
//! off), grows the pool step by step without a failed write, and the grows show in the
//! Prometheus endpoint and in `thinsnap status`.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::fs::FileExt,
};

use common::daemon::{Daemon, Mounted};
use sha2::Digest;

const MIB: u64 = 1 << 20;

/// GETs `path` from the metrics endpoint; returns the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn sample(text: &str, name: &str) -> f64 {
    thinsnap::metrics::parse(text)
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn loop_autogrow_keeps_a_writer_going_and_is_counted() {
    let addr = format!("127.0.0.1:{}", 20_000 + std::process::id() % 30_000);
    let d = Daemon::start_custom(
        &format!("default_size = \"2G\"\n[metrics]\nlisten = \"{addr}\""),
        Some(
            "[pool.loopback]\ndata_size = \"256M\"\nmetadata_size = \"64M\"\n\
             [pool.autogrow]\nenabled = true\nthreshold = \"40%\"\ndata_step = \"256M\"\n\
             max_data_size = \"1G\"\ncheck_interval = \"10m\"",
        ),
    );
    let pool = d.pool.to_string();
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let total = format!("thinsnap_pool_data_total_bytes{{pool=\"{pool}\"}}");
    assert_eq!(sample(&body, &total), (256 * MIB) as f64);
    assert_eq!(http_get(&addr, "/other").0, "HTTP/1.1 404 Not Found");

    let mut c = d.client().await;
    let m = c.prepare("writer", "").await.unwrap();
    let mnt = Mounted::new(d.dir.path(), "writer", &m);

    // 480 MiB through a 256 MiB pool, synced every 16 MiB: every write and sync must
    // succeed (the pool fails writes at once when out of space).
    let path = mnt.path.join("data");
    let writer = std::thread::spawn(move || -> Result<String, String> {
        let f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let mut h = sha2::Sha256::new();
        let mut chunk = vec![0u8; 4 * MIB as usize];
        for i in 0..120u64 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i as usize * 31 + j / 4096) as u8;
            }
            f.write_all_at(&chunk, i * 4 * MIB)
                .map_err(|e| format!("write {i}: {e}"))?;
            h.update(&chunk);
            if i % 4 == 3 {
                f.sync_data().map_err(|e| format!("sync after {i}: {e}"))?;
            }
        }
        f.sync_all().map_err(|e| format!("final sync: {e}"))?;
        Ok(hex::encode(h.finalize()))
    });
    let sum = writer.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "a write failed while the pool should have grown: {e}\n{}",
            std::fs::read_to_string(d.log()).unwrap()
        )
    });
    assert_eq!(common::sha256_file(&mnt.path.join("data")), sum);

    let (_, body) = http_get(&addr, "/metrics");
    let grows = sample(
        &body,
        &format!("thinsnap_pool_grows_total{{pool=\"{pool}\",device=\"data\"}}"),
    );
    let total = sample(&body, &total);
    assert!(
        grows >= 2.0,
        "480 MiB needs at least two 256 MiB steps: {grows}"
    );
    assert!(
        total >= (768 * MIB) as f64 && total <= (1024 * MIB) as f64,
        "data total {total}"
    );
    assert_eq!(
        sample(
            &body,
            &format!("thinsnap_pool_grow_failures_total{{pool=\"{pool}\"}}")
        ),
        0.0
    );
    assert!(
        sample(
            &body,
            "thinsnap_requests_total{method=\"prepare\",code=\"OK\"}"
        ) >= 1.0,
        "{body}"
    );
    let log = std::fs::read_to_string(d.log()).unwrap();
    assert_eq!(
        log.matches("pool autogrow: grew the pool").count() as f64,
        grows,
        "{log}"
    );
    let out = d.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("pool grows      {grows} data")),
        "{text}"
    );
    drop(mnt);
    c.remove("writer").await.unwrap();
}
