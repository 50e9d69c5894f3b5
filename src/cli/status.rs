//! `thinsnap status`: the running daemon's figures for a person, from the same metrics its
//! Prometheus endpoint serves.

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::{Context, Result};
use thinpool::units::format_size;

use thinsnap_core::config::Config;

use crate::{metrics, service::client::Client};

/// Prints the summary (or, with `raw`, the metrics text).
pub fn run(config: &Config, raw: bool) -> Result<ExitCode> {
    let mut c = Client::connect(&config.socket).with_context(|| {
        format!(
            "thinsnap is not running on {} (`systemctl status thinsnap`); \
             `thinsnap pool status` works without it",
            config.socket.display()
        )
    })?;
    let text = c.metrics()?;
    if raw {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let m = metrics::parse(&text);
    let pool = config.pool_name.to_string();
    let get = |name: &str, extra: &str| -> Option<f64> {
        let sep = if extra.is_empty() { "" } else { "," };
        m.get(&format!("{name}{{pool=\"{pool}\"{sep}{extra}}}"))
            .copied()
    };
    let sum_where = |prefix: &str, pred: &dyn Fn(&str) -> bool| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(prefix) && pred(k))
            .map(|(_, v)| v)
            .sum()
    };
    println!("pool            {pool}");
    if get("thinsnap_pool_up", "") != Some(1.0) {
        println!("status          unreadable: see `thinsnap pool status` and the daemon's log");
    } else {
        let line = |what: &str, used: &str, total: &str| {
            let (u, t) = (get(used, "").unwrap_or(0.0), get(total, "").unwrap_or(0.0));
            println!(
                "{what:<16}{} of {} ({:.1}%)",
                format_size(u as u64),
                format_size(t as u64),
                if t > 0.0 { u / t * 100.0 } else { 0.0 }
            );
        };
        line(
            "data",
            "thinsnap_pool_data_used_bytes",
            "thinsnap_pool_data_total_bytes",
        );
        line(
            "metadata",
            "thinsnap_pool_metadata_used_bytes",
            "thinsnap_pool_metadata_total_bytes",
        );
        let mode = m
            .keys()
            .find_map(|k| {
                k.strip_prefix("thinsnap_pool_mode{")
                    .and_then(|r| r.split("mode=\"").nth(1))
                    .map(|r| r.trim_end_matches("\"}").to_string())
            })
            .unwrap_or_default();
        let check = if get("thinsnap_pool_needs_check", "") == Some(1.0) {
            " (needs_check: run `thinsnap pool repair`)"
        } else {
            ""
        };
        println!("mode            {mode}{check}");
    }
    let kinds: BTreeMap<&str, f64> = ["active", "committed", "view"]
        .into_iter()
        .map(|k| {
            (
                k,
                get("thinsnap_snapshots", &format!("kind=\"{k}\"")).unwrap_or(0.0),
            )
        })
        .collect();
    println!(
        "snapshots       {} committed, {} active, {} views",
        kinds["committed"], kinds["active"], kinds["view"]
    );
    println!(
        "thin devices    {}",
        get("thinsnap_thin_devices", "").unwrap_or(0.0)
    );
    println!(
        "to reclaim      {} removed snapshot(s)' devices (discarded and deleted in the background)",
        get("thinsnap_reclaim_pending", "").unwrap_or(0.0)
    );
    println!(
        "pool grows      {} data, {} metadata, {} failed{}",
        get("thinsnap_pool_grows_total", "device=\"data\"").unwrap_or(0.0),
        get("thinsnap_pool_grows_total", "device=\"metadata\"").unwrap_or(0.0),
        get("thinsnap_pool_grow_failures_total", "").unwrap_or(0.0),
        if config.autogrow.enabled {
            ""
        } else {
            " (autogrow off)"
        }
    );
    let total = sum_where("thinsnap_requests_total{", &|_| true);
    let errors = sum_where("thinsnap_requests_total{", &|k| !k.contains("code=\"OK\""));
    println!("requests        {total} since start, {errors} answered with an error");
    let mut by_code: BTreeMap<String, f64> = BTreeMap::new();
    for (k, v) in &m {
        if let Some(code) = k
            .strip_prefix("thinsnap_requests_total{")
            .and_then(|r| r.split("code=\"").nth(1))
            .map(|r| r.trim_end_matches("\"}"))
        {
            if code != "OK" {
                *by_code.entry(code.to_string()).or_default() += v;
            }
        }
    }
    for (code, n) in by_code {
        println!("  {code:<14}{n}");
    }
    Ok(ExitCode::SUCCESS)
}
