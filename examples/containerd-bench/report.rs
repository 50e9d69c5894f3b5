//! The benchmark's tables (Markdown, as docs/benchmarks.md keeps them), the targets met or
//! missed, and where thinsnap's time goes.

use std::time::Duration;

use thinsnap::bench::{summarize, Summary};

use crate::{
    setup::{DEVMAPPER, THINSNAP},
    BySnapshotter, Op, Results,
};

/// 1000 -> "1,000".
pub fn thousands(n: u32) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Prepare => "Prepare",
        Op::Commit => "Commit",
        Op::View => "View",
        Op::Remove => "Remove (API call)",
        Op::Gc => "Remove: gc of 2 snapshots",
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn ms_summary(v: &[f64]) -> Summary {
    let mut d: Vec<Duration> = v
        .iter()
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .collect();
    summarize(&mut d)
}

/// Prints everything to stdout.
pub fn print(r: &Results) {
    let sns = &r.snapshotters;
    let has = |s: &str| sns.iter().any(|x| x == s);

    println!();
    println!(
        "## Garbage collection of a chain of {} committed snapshots (s; ratio to devmapper)",
        crate::GC_CHAIN
    );
    println!();
    let dm = r.gc_chain.get(DEVMAPPER).copied();
    for sn in sns {
        if let Some(secs) = r.gc_chain.get(sn) {
            let x = match (sn.as_str(), dm) {
                (DEVMAPPER, _) | (_, None) => String::new(),
                (_, Some(d)) => format!(" ({:.2}x)", secs / d),
            };
            println!("- {sn}: {secs:.2}{x}");
        }
    }

    println!();
    println!("## Snapshots API through containerd (ms; ratios of p50 to devmapper)");
    println!();
    let mut head = "| operation | present |".to_string();
    let mut rule = "|---|---|".to_string();
    for sn in sns {
        head += &format!(" {sn} p50 | p99 |");
        rule += "---:|---:|";
        if sn != DEVMAPPER && has(DEVMAPPER) {
            head += " / devmapper |";
            rule += "---:|";
        }
    }
    println!("{head}\n{rule}");
    // p50 by (phase, snapshotter, op), for the targets below.
    let mut p50 = std::collections::HashMap::new();
    for (pi, phase) in r.phases.iter().enumerate() {
        for op in Op::ALL {
            let mut row = format!("| {} | {} |", op_name(op), phase.name);
            let base = phase
                .samples
                .get(&(DEVMAPPER.to_string(), op))
                .map(|v| summarize(&mut v.clone()).p50);
            for sn in sns {
                let s = phase
                    .samples
                    .get(&(sn.clone(), op))
                    .map(|v| summarize(&mut v.clone()));
                match s {
                    Some(s) => {
                        row += &format!(" {:.1} | {:.1} |", s.p50, s.p99);
                        p50.insert((pi, sn.clone(), op), s.p50);
                    }
                    None => row += " - | - |",
                }
                if sn != DEVMAPPER && has(DEVMAPPER) {
                    row += &format!(" {} |", ratio(s.map(|s| s.p50), base));
                }
            }
            println!("{row}");
        }
    }

    println!();
    println!("## Images and containers through ctr (seconds, wall clock incl. ctr's start)");
    println!();
    let mut head = "| |".to_string();
    let mut rule = "|---|".to_string();
    for sn in sns {
        head += &format!(" {sn} |");
        rule += "---:|";
    }
    if has(THINSNAP) && has(DEVMAPPER) {
        head += " thinsnap / devmapper |";
        rule += "---:|";
    }
    if has(THINSNAP) && has("overlayfs") {
        head += " thinsnap / overlayfs |";
        rule += "---:|";
    }
    println!("{head}\n{rule}");
    let im = &r.images;
    let rows: [(String, &BySnapshotter, bool); 3] = [
        (
            format!(
                "`ctr images import`, busybox (1 layer, {:.1} MB)",
                im.small_mb
            ),
            &im.small,
            false,
        ),
        (
            format!(
                "`ctr images import`, {:.0} MB (3 layers, {} files)",
                im.large_mb,
                thousands(im.large_files)
            ),
            &im.large,
            false,
        ),
        ("`ctr run --rm` busybox `true`".into(), &im.run, true),
    ];
    let mut image_ratio = std::collections::HashMap::new();
    for (label, m, is_run) in &rows {
        let val = |sn: &str| {
            m.get(sn)
                .and_then(|v| if *is_run { median(v) } else { mean(v) })
        };
        let mut row = format!("| {label} |");
        for sn in sns {
            row += &match val(sn) {
                Some(v) => format!(" {v:.2} |"),
                None => " - |".into(),
            };
        }
        if has(THINSNAP) && has(DEVMAPPER) {
            row += &format!(" {} |", ratio(val(THINSNAP), val(DEVMAPPER)));
        }
        if has(THINSNAP) && has("overlayfs") {
            row += &format!(" {} |", ratio(val(THINSNAP), val("overlayfs")));
        }
        image_ratio.insert(
            label.clone(),
            (
                val(THINSNAP).zip(val(DEVMAPPER)).map(|(a, b)| a / b),
                val(THINSNAP).zip(val("overlayfs")).map(|(a, b)| a / b),
            ),
        );
        println!("{row}");
    }
    println!();
    println!(
        "Imports: mean of {} rounds (each a new copy of the image); `ctr run`: median of {} runs.",
        im.small.values().map(Vec::len).max().unwrap_or(0),
        im.run.values().map(Vec::len).max().unwrap_or(0)
    );
    for (name, map) in [
        ("small import", &im.small),
        ("large import", &im.large),
        ("ctr run", &im.run),
    ] {
        let parts: Vec<String> = sns
            .iter()
            .map(|sn| {
                let v: Vec<String> = map
                    .get(sn)
                    .map(|v| v.iter().map(|s| format!("{s:.2}")).collect())
                    .unwrap_or_default();
                format!("{sn} [{}]", v.join(", "))
            })
            .collect();
        println!("  {name} runs (s): {}", parts.join("; "));
    }

    println!();
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "RSS at the end: containerd {:.1} MiB (peak {:.1} MiB; devmapper and overlayfs run inside it), \
         thinsnap daemon {:.1} MiB (peak {:.1} MiB).",
        mib(r.containerd_rss.0),
        mib(r.containerd_rss.1),
        mib(r.thinsnap_rss.0),
        mib(r.thinsnap_rss.1)
    );
    if !r.fill_secs.is_empty() {
        let parts: Vec<String> = r
            .fill_secs
            .iter()
            .map(|(sn, s)| format!("{sn} {s:.0} s"))
            .collect();
        println!(
            "Filling to {} committed snapshots (all snapshotters at once): {}.",
            thousands(r.committed),
            parts.join(", ")
        );
    }

    if has(THINSNAP) {
        println!();
        println!("## Targets");
        println!();
        if has(DEVMAPPER) {
            for (pi, phase) in r.phases.iter().enumerate() {
                let parts: Vec<String> = [Op::Prepare, Op::Commit, Op::View, Op::Gc]
                    .iter()
                    .map(|op| {
                        let t = p50.get(&(pi, THINSNAP.to_string(), *op));
                        let d = p50.get(&(pi, DEVMAPPER.to_string(), *op));
                        let x = t.zip(d).map(|(t, d)| t / d);
                        format!(
                            "{} {} ({})",
                            op_name(*op),
                            x.map_or("-".into(), |x| format!("{x:.2}x")),
                            if x.is_some_and(|x| x <= 0.2) {
                                "met"
                            } else {
                                "missed"
                            }
                        )
                    })
                    .collect();
                println!(
                    "- per-op p50, thinsnap / devmapper, {} (target at most 0.20x): {}",
                    phase.name,
                    parts.join(", ")
                );
            }
        }
        for (label, (vs_dm, vs_ov)) in &image_ratio {
            if !label.contains("import") {
                continue;
            }
            if let Some(x) = vs_dm {
                println!(
                    "- {label}: thinsnap / devmapper {x:.2}x (target at most 1.00x: {})",
                    if *x <= 1.0 { "met" } else { "missed" }
                );
            }
            if let Some(x) = vs_ov {
                println!(
                    "- {label}: thinsnap / overlayfs {x:.2}x (target at most 1.20x: {})",
                    if *x <= 1.2 { "met" } else { "missed" }
                );
            }
        }

        println!();
        println!("## Where thinsnap's time goes");
        println!();
        for (what, secs, log) in &r.images.thinsnap_share {
            let total: f64 = log.requests.values().flatten().sum();
            let parts: Vec<String> = log
                .requests
                .iter()
                .map(|(m, v)| format!("{} {m} {:.2} s", v.len(), v.iter().sum::<f64>() / 1000.0))
                .collect();
            println!(
                "- {what} on thinsnap: {secs:.2} s, of which thinsnap's requests {:.2} s ({})",
                total / 1000.0,
                parts.join(", ")
            );
        }
        if let Some(ms) = r.dmsetup_ms {
            println!("- one `dmsetup info` process (what devmapper runs several of per operation): p50 {ms:.1} ms");
        }
        for (pi, phase) in r.phases.iter().enumerate() {
            let parts: Vec<String> = phase
                .thinsnap
                .requests
                .iter()
                .map(|(m, v)| {
                    let s = ms_summary(v);
                    format!("{m} {:.1} / {:.1} ms (n={})", s.p50, s.p99, v.len())
                })
                .collect();
            println!(
                "- {}: thinsnap's own time per request (p50 / p99, from its `done ms=` log): {}",
                phase.name,
                parts.join(", ")
            );
            let mut over = Vec::new();
            for (op, method) in [
                (Op::Prepare, "prepare"),
                (Op::Commit, "commit"),
                (Op::View, "view"),
            ] {
                let client = p50.get(&(pi, THINSNAP.to_string(), op));
                let own = phase
                    .thinsnap
                    .requests
                    .get(method)
                    .map(|v| ms_summary(v).p50);
                if let (Some(c), Some(o)) = (client, own) {
                    over.push(format!("{} {:.1} ms of {c:.1} ms", op_name(op), c - o));
                }
            }
            if !over.is_empty() {
                println!(
                    "  containerd's share of thinsnap's p50 (client's time minus thinsnap's): {}",
                    over.join(", ")
                );
            }
        }
        for phase in &r.phases {
            if phase.thinsnap.spans.is_empty() {
                continue;
            }
            println!();
            println!(
                "thinsnap's profile, {} (busy time of each step, THINSNAP_LOG_SPANS=1):",
                phase.name
            );
            println!();
            println!("| step | n | p50 ms | p99 ms |");
            println!("|---|---:|---:|---:|");
            for (path, v) in &phase.thinsnap.spans {
                let s = ms_summary(v);
                println!("| {path} | {} | {:.2} | {:.2} |", v.len(), s.p50, s.p99);
            }
        }
    }
}
