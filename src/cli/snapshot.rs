//! `thinsnap snapshot ...`: list, tree, info, prepare, view, commit, mounts, mount, umount,
//! rm, usage, label, cleanup — all through the running daemon's socket.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;
use thinpool::{units::format_size, FsType};

use super::table;
use crate::{
    config::Config,
    service::{api::snapshots::Info, api::Mount, client::Client},
    store::record::civil,
};

/// Label that marks a view made by `snapshot mount` to inspect a committed snapshot.
pub const INSPECT_LABEL: &str = "thinsnap/inspect-mount";

/// `thinsnap snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// List snapshots.
    #[command(alias = "ls")]
    List {
        /// containerd filters, e.g. kind==committed or labels."containerd.io/gc.root" (OR'ed).
        #[arg(long = "filter")]
        filters: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Draw the parent chains.
    Tree {
        /// Print JSON (each snapshot with its children).
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot: kind, parent, labels, times, usage, mounts.
    Info {
        /// Snapshot key.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create an active snapshot (as containerd's Prepare) and print its mounts.
    Prepare {
        /// New snapshot key.
        key: String,
        /// Committed parent (none: an empty filesystem).
        parent: Option<String>,
        /// Labels, KEY=VALUE.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Create a read-only view of a committed snapshot and print its mounts.
    View {
        /// New view key.
        key: String,
        /// Committed parent.
        parent: String,
        /// Labels, KEY=VALUE.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Commit an active snapshot under a name.
    Commit {
        /// Name of the committed snapshot.
        name: String,
        /// Active snapshot key.
        key: String,
        /// Labels, KEY=VALUE.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Print the mount command for an active snapshot or view.
    Mounts {
        /// Snapshot key.
        key: String,
        /// Where it would be mounted.
        #[arg(default_value = "/mnt")]
        target: PathBuf,
    },
    /// Mount a snapshot at PATH for inspection: active ones read-write, committed ones
    /// read-only (through a temporary view, removed by `umount`).
    Mount {
        /// Snapshot key.
        key: String,
        /// Mount point (an existing directory).
        path: PathBuf,
    },
    /// Unmount a path mounted with `snapshot mount` (and remove its temporary view).
    Umount {
        /// Mount point.
        path: PathBuf,
    },
    /// Remove snapshots; refuses while a snapshot has children or is mounted.
    #[command(alias = "remove")]
    Rm {
        /// Snapshot keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Show disk usage (all snapshots, or those named).
    Usage {
        /// Snapshot keys.
        keys: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set or (with an empty value, KEY=) remove labels.
    Label {
        /// Snapshot key.
        key: String,
        /// Labels, KEY=VALUE.
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Finish pending (asynchronous) removals.
    Cleanup,
}

fn parse_labels(labels: &[String]) -> Result<HashMap<String, String>> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("label {l:?} must be KEY=VALUE"),
        })
        .collect()
}

fn kind(i: &Info) -> &'static str {
    match i.kind {
        1 => "view",
        2 => "active",
        3 => "committed",
        _ => "unknown",
    }
}

fn time(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .map(|t| {
            let secs = t.seconds;
            let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
            let (y, m, d) = civil(days);
            format!(
                "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60
            )
        })
        .unwrap_or_default()
}

fn info_json(i: &Info) -> serde_json::Value {
    json!({
        "name": i.name,
        "parent": i.parent,
        "kind": kind(i),
        "created": time(&i.created_at),
        "updated": time(&i.updated_at),
        "labels": i.labels.iter().collect::<BTreeMap<_, _>>(),
    })
}

fn print_mounts(mounts: &[Mount], target: &Path) {
    for m in mounts {
        let opts = if m.options.is_empty() {
            String::new()
        } else {
            format!(" -o {}", m.options.join(","))
        };
        println!(
            "mount -t {} {} {}{opts}",
            m.r#type,
            m.source,
            target.display()
        );
    }
}

fn mount_at(mounts: &[Mount], path: &Path) -> Result<()> {
    let m = mounts.first().context("the daemon returned no mount")?;
    let fs: FsType = m.r#type.parse()?;
    thinpool::fs::mount(Path::new(&m.source), path, fs, &m.options)?;
    Ok(())
}

/// Runs a snapshot command against the daemon.
pub fn run(config: &Config, cmd: &SnapshotCmd) -> Result<ExitCode> {
    let mut c = Client::connect(&config.socket)?;
    match cmd {
        SnapshotCmd::List { filters, json } => {
            let mut infos = c.list(filters.clone())?;
            infos.sort_by(|a, b| a.name.cmp(&b.name));
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&infos.iter().map(info_json).collect::<Vec<_>>())?
                );
            } else {
                let rows: Vec<Vec<String>> = infos
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            kind(i).into(),
                            i.parent.clone(),
                            time(&i.created_at),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(&["NAME", "KIND", "PARENT", "CREATED"], &rows)
                );
            }
        }
        SnapshotCmd::Tree { json } => {
            let infos = c.list(vec![])?;
            let mut children: BTreeMap<String, Vec<&Info>> = BTreeMap::new();
            for i in &infos {
                children.entry(i.parent.clone()).or_default().push(i);
            }
            for v in children.values_mut() {
                v.sort_by(|a, b| a.name.cmp(&b.name));
            }
            if *json {
                fn node(i: &Info, ch: &BTreeMap<String, Vec<&Info>>) -> serde_json::Value {
                    let kids: Vec<_> = ch
                        .get(&i.name)
                        .map(|v| v.iter().map(|c| node(c, ch)).collect())
                        .unwrap_or_default();
                    json!({"name": i.name, "kind": kind(i), "children": kids})
                }
                let roots: Vec<_> = children
                    .get("")
                    .map(|v| v.iter().map(|i| node(i, &children)).collect())
                    .unwrap_or_default();
                println!("{}", serde_json::to_string_pretty(&roots)?);
            } else {
                fn draw(
                    i: &Info,
                    ch: &BTreeMap<String, Vec<&Info>>,
                    prefix: &str,
                    last: bool,
                    root: bool,
                ) {
                    let (branch, next) = if root {
                        ("", "")
                    } else if last {
                        ("└── ", "    ")
                    } else {
                        ("├── ", "│   ")
                    };
                    println!("{prefix}{branch}{} ({})", i.name, kind(i));
                    let kids = ch.get(&i.name).map(Vec::as_slice).unwrap_or_default();
                    for (n, k) in kids.iter().enumerate() {
                        draw(
                            k,
                            ch,
                            &format!("{prefix}{next}"),
                            n + 1 == kids.len(),
                            false,
                        );
                    }
                }
                for root in children.get("").map(Vec::as_slice).unwrap_or_default() {
                    draw(root, &children, "", true, true);
                }
            }
        }
        SnapshotCmd::Info { key, json } => {
            let i = c.stat(key)?;
            let (bytes, inodes) = c.usage(key)?;
            let mounts = if i.kind == 3 { vec![] } else { c.mounts(key)? };
            if *json {
                let mut v = info_json(&i);
                v["usage"] = json!({"bytes": bytes, "inodes": inodes});
                v["mounts"] = json!(mounts
                    .iter()
                    .map(|m| json!({"type": m.r#type, "source": m.source, "options": m.options}))
                    .collect::<Vec<_>>());
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("name     {}", i.name);
                println!("kind     {}", kind(&i));
                println!("parent   {}", i.parent);
                println!("created  {}", time(&i.created_at));
                println!("updated  {}", time(&i.updated_at));
                println!(
                    "usage    {} in {inodes} inodes",
                    format_size(bytes.max(0) as u64)
                );
                for (k, v) in i.labels.iter().collect::<BTreeMap<_, _>>() {
                    println!("label    {k}={v}");
                }
                for m in &mounts {
                    println!("mount    {} {} {}", m.r#type, m.source, m.options.join(","));
                }
            }
        }
        SnapshotCmd::Prepare {
            key,
            parent,
            labels,
        } => {
            let m = c.create(
                false,
                key,
                parent.as_deref().unwrap_or(""),
                parse_labels(labels)?,
            )?;
            print_mounts(&m, Path::new("/mnt"));
        }
        SnapshotCmd::View {
            key,
            parent,
            labels,
        } => {
            let m = c.create(true, key, parent, parse_labels(labels)?)?;
            print_mounts(&m, Path::new("/mnt"));
        }
        SnapshotCmd::Commit { name, key, labels } => c.commit(name, key, parse_labels(labels)?)?,
        SnapshotCmd::Mounts { key, target } => print_mounts(&c.mounts(key)?, target),
        SnapshotCmd::Mount { key, path } => {
            let path = std::fs::canonicalize(path)
                .with_context(|| format!("mount point {} does not exist", path.display()))?;
            let i = c.stat(key)?;
            if i.kind == 3 {
                let view = format!("inspect:{}:{}", key, path.display());
                let mut l = HashMap::new();
                l.insert(INSPECT_LABEL.to_string(), path.display().to_string());
                let m = c.create(true, &view, key, l)?;
                if let Err(e) = mount_at(&m, &path) {
                    let _ = c.remove(&view);
                    return Err(e);
                }
                println!("{key} (committed) mounted read-only at {}", path.display());
            } else {
                mount_at(&c.mounts(key)?, &path)?;
                println!("{key} ({}) mounted at {}", kind(&i), path.display());
            }
        }
        SnapshotCmd::Umount { path } => {
            let path = std::fs::canonicalize(path)
                .with_context(|| format!("{} does not exist", path.display()))?;
            if !thinpool::fs::is_mounted(&path)? {
                bail!("{} is not mounted", path.display());
            }
            thinpool::fs::umount(&path)?;
            let filter = format!("labels.\"{INSPECT_LABEL}\"==\"{}\"", path.display());
            for v in c.list(vec![filter])? {
                c.remove(&v.name)?;
            }
            println!("unmounted {}", path.display());
        }
        SnapshotCmd::Rm { keys } => {
            for k in keys {
                c.remove(k)?;
                println!("removed {k}");
            }
        }
        SnapshotCmd::Usage { keys, json } => {
            let keys: Vec<String> = if keys.is_empty() {
                let mut v: Vec<String> = c.list(vec![])?.into_iter().map(|i| i.name).collect();
                v.sort();
                v
            } else {
                keys.clone()
            };
            let mut rows = Vec::new();
            for k in &keys {
                let (b, n) = c.usage(k)?;
                rows.push((k.clone(), b, n));
            }
            if *json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(k, b, n)| json!({"name": k, "bytes": b, "inodes": n}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let r: Vec<Vec<String>> = rows
                    .iter()
                    .map(|(k, b, n)| {
                        vec![k.clone(), format_size((*b).max(0) as u64), n.to_string()]
                    })
                    .collect();
                print!("{}", table::render(&["NAME", "SIZE", "INODES"], &r));
            }
        }
        SnapshotCmd::Label { key, labels } => {
            let l = parse_labels(labels)?;
            let paths = l.keys().map(|k| format!("labels.{k}")).collect();
            let set: HashMap<String, String> =
                l.into_iter().filter(|(_, v)| !v.is_empty()).collect();
            let i = c.update(key, set, paths)?;
            for (k, v) in i.labels.iter().collect::<BTreeMap<_, _>>() {
                println!("{k}={v}");
            }
        }
        SnapshotCmd::Cleanup => c.cleanup()?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_417), (2025, 11, 25));
        let ts = Some(prost_types::Timestamp {
            seconds: 86_400 + 3_661,
            nanos: 0,
        });
        assert_eq!(time(&ts), "1970-01-02 01:01:01");
    }

    #[test]
    fn labels_parse() {
        let l = parse_labels(&["a=1".into(), "b=".into()]).unwrap();
        assert_eq!(l.get("a").unwrap(), "1");
        assert_eq!(l.get("b").unwrap(), "");
        assert!(parse_labels(&["novalue".into()]).is_err());
        assert!(parse_labels(&["=v".into()]).is_err());
    }
}
