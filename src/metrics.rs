//! What the daemon counts, and its Prometheus text exposition: requests by method and gRPC
//! code, their latency histograms, pool grows, and (read when scraped) the pool's space,
//! thin devices and snapshots by kind. Served at `[metrics] listen` over HTTP, through the
//! admin API (`thinsnap status`).

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use thinsnap_core::{Engine, ErrorKind};

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// The daemon's counters; one per process, shared by the services and the pool watcher.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    grows_data: AtomicU64,
    grows_metadata: AtomicU64,
    grow_failures: AtomicU64,
    in_flight: AtomicU64,
    idle: tokio::sync::Notify,
    /// The last rendered text, and when.
    rendered: Mutex<Option<(std::time::Instant, String)>>,
}

/// How long a rendered text is served again.
const RENDER_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// A request in flight, counted until dropped.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What a pool grow changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grown {
    /// The data device.
    Data,
    /// The metadata device.
    Metadata,
}

impl Metrics {
    /// Counts a request in flight until the guard is dropped.
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self)
    }

    /// How many requests are in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits until no request is in flight, or until `deadline`.
    pub async fn idle_until(&self, deadline: tokio::time::Instant) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0
                || tokio::time::timeout_at(deadline, idle).await.is_err()
            {
                return;
            }
        }
    }

    /// Counts a finished request of `method` that took `seconds` and succeeded (`None`) or
    /// failed with an error of `kind`.
    pub fn observe(&self, method: &'static str, kind: Option<ErrorKind>, seconds: f64) {
        *lock(&self.requests)
            .entry((method, code_name(kind)))
            .or_default() += 1;
        let mut latency = lock(&self.latency);
        let h = latency.entry(method).or_default();
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// Counts a pool grow.
    pub fn grew(&self, what: Grown) {
        match what {
            Grown::Data => &self.grows_data,
            Grown::Metadata => &self.grows_metadata,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a pool grow that failed.
    pub fn grow_failed(&self) {
        self.grow_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Pool grows performed so far: (data, metadata).
    pub fn grows(&self) -> (u64, u64) {
        (
            self.grows_data.load(Ordering::Relaxed),
            self.grows_metadata.load(Ordering::Relaxed),
        )
    }

    /// [`Metrics::render`], at most once per second: scrapers and `thinsnap status` get the
    /// same text within that second (one scrape at a time renders).
    pub fn render_cached(&self, snap: &Engine) -> String {
        let mut cache = lock(&self.rendered);
        if let Some((at, text)) = &*cache {
            if at.elapsed() < RENDER_TTL {
                return text.clone();
            }
        }
        let text = self.render(snap);
        *cache = Some((std::time::Instant::now(), text.clone()));
        text
    }

    /// The Prometheus text exposition of everything, reading the pool's status (without a
    /// metadata commit) and the store's snapshots now. Pool or store figures that cannot be read are left out and
    /// `thinsnap_pool_up` is 0.
    pub fn render(&self, snap: &Engine) -> String {
        let mut out = String::new();
        let pool = snap.config().pool_name.to_string();
        let l = format!("pool=\"{pool}\"");
        match snap.pool_status(false) {
            Ok(st) => {
                gauge(
                    &mut out,
                    "thinsnap_pool_up",
                    "Whether the pool's status can be read.",
                    &[(&l, 1.0)],
                );
                gauge(
                    &mut out,
                    "thinsnap_pool_data_used_bytes",
                    "Pool data space in use.",
                    &[(&l, st.data_used_bytes() as f64)],
                );
                gauge(
                    &mut out,
                    "thinsnap_pool_data_total_bytes",
                    "Pool data space.",
                    &[(&l, st.data_total_bytes() as f64)],
                );
                gauge(
                    &mut out,
                    "thinsnap_pool_metadata_used_bytes",
                    "Pool metadata space in use (including the kernel's reserve).",
                    &[(&l, st.meta_used_bytes() as f64)],
                );
                gauge(
                    &mut out,
                    "thinsnap_pool_metadata_total_bytes",
                    "Pool metadata space.",
                    &[(&l, st.meta_total_bytes() as f64)],
                );
                let mode = st.mode.to_string();
                gauge(
                    &mut out,
                    "thinsnap_pool_mode",
                    "The pool's mode (1 for the current one): rw, read-only, out-of-space, failed.",
                    &[(&format!("{l},mode=\"{mode}\""), 1.0)],
                );
                gauge(
                    &mut out,
                    "thinsnap_pool_needs_check",
                    "Whether the kernel flagged the pool's metadata for checking.",
                    &[(&l, f64::from(u8::from(st.needs_check)))],
                );
            }
            Err(_) => gauge(
                &mut out,
                "thinsnap_pool_up",
                "Whether the pool's status can be read.",
                &[(&l, 0.0)],
            ),
        }
        if let Ok(c) = snap.counts() {
            let samples: Vec<(String, f64)> = [
                ("active", c.active),
                ("committed", c.committed),
                ("view", c.views),
            ]
            .iter()
            .map(|(k, n)| (format!("{l},kind=\"{k}\""), *n as f64))
            .collect();
            let refs: Vec<(&String, f64)> = samples.iter().map(|(a, b)| (a, *b)).collect();
            gauge(&mut out, "thinsnap_snapshots", "Snapshots by kind.", &refs);
            gauge(
                &mut out,
                "thinsnap_volumes",
                "Docker volumes (each a thin device of its own).",
                &[(&l, c.volumes as f64)],
            );
            gauge(
                &mut out,
                "thinsnap_reclaim_pending",
                "Removed snapshots' devices waiting to be reclaimed (discarded and deleted) in the background.",
                &[(&l, c.reclaiming as f64)],
            );
            gauge(
                &mut out,
                "thinsnap_thin_devices",
                "Thin devices thinsnap keeps in the pool (snapshots, volumes and base devices).",
                &[(&l, c.thin_devices() as f64)],
            );
        }
        let (data, meta) = self.grows();
        counter_head(
            &mut out,
            "thinsnap_pool_grows_total",
            "Pool grows performed by the daemon.",
        );
        let _ = writeln!(
            out,
            "thinsnap_pool_grows_total{{{l},device=\"data\"}} {data}"
        );
        let _ = writeln!(
            out,
            "thinsnap_pool_grows_total{{{l},device=\"metadata\"}} {meta}"
        );
        counter_head(
            &mut out,
            "thinsnap_pool_grow_failures_total",
            "Pool grows that failed.",
        );
        let _ = writeln!(
            out,
            "thinsnap_pool_grow_failures_total{{{l}}} {}",
            self.grow_failures.load(Ordering::Relaxed)
        );
        counter_head(
            &mut out,
            "thinsnap_requests_total",
            "Requests by method and gRPC code.",
        );
        for ((method, code), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "thinsnap_requests_total{{method=\"{method}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP thinsnap_request_duration_seconds Request latency by method."
        );
        let _ = writeln!(out, "# TYPE thinsnap_request_duration_seconds histogram");
        for (method, h) in lock(&self.latency).iter() {
            for (le, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(out, "thinsnap_request_duration_seconds_bucket{{method=\"{method}\",le=\"{le}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "thinsnap_request_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "thinsnap_request_duration_seconds_sum{{method=\"{method}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "thinsnap_request_duration_seconds_count{{method=\"{method}\"}} {}",
                h.count
            );
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(&String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

fn counter_head(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
}

/// The name containerd and grpc-go use for the code of an outcome, e.g. `NotFound`.
fn code_name(kind: Option<ErrorKind>) -> &'static str {
    match kind {
        None => "OK",
        Some(ErrorKind::NotFound) => "NotFound",
        Some(ErrorKind::AlreadyExists) => "AlreadyExists",
        Some(ErrorKind::FailedPrecondition) => "FailedPrecondition",
        Some(ErrorKind::InvalidArgument) => "InvalidArgument",
        Some(ErrorKind::ResourceExhausted) => "ResourceExhausted",
        Some(ErrorKind::Unavailable) => "Unavailable",
        Some(ErrorKind::Internal) => "Internal",
    }
}

/// Parses the samples of a text exposition: `name{labels}` → value (for `thinsnap status`
/// and tests).
pub fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_parse_back() {
        let m = Metrics::default();
        m.observe("prepare", None, 0.02);
        m.observe("prepare", Some(ErrorKind::NotFound), 3.0);
        m.grew(Grown::Data);
        let mut out = String::new();
        for (method, h) in lock(&m.latency).iter() {
            for (le, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(out, "b{{method=\"{method}\",le=\"{le}\"}} {n}");
            }
        }
        let s = parse(&out);
        assert_eq!(s["b{method=\"prepare\",le=\"0.01\"}"], 0.0);
        assert_eq!(s["b{method=\"prepare\",le=\"0.025\"}"], 1.0);
        assert_eq!(s["b{method=\"prepare\",le=\"5\"}"], 2.0);
        assert_eq!(lock(&m.requests)[&("prepare", "NotFound")], 1);
        assert_eq!(m.grows(), (1, 0));
    }
}
