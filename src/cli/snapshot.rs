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
use thinsnap_core::{config::Config, labels::KEEP_LABEL, time::civil};

use crate::service::{api::snapshots::Info, api::Mount, client::Client};

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
    /// Remove snapshots; refuses while a snapshot has children or is mounted. A snapshot
    /// kept from containerd's garbage collector (one adopted from Docker) is removed too.
    #[command(alias = "remove")]
    Rm {
        /// Snapshot keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Show disk usage (all snapshots, or those named): EXCLUSIVE is containerd's Usage,
    /// the blocks the snapshot's device wrote itself (for a layer, what it added to its
    /// parent); MAPPED everything it maps, shared blocks included; FREEABLE what only it
    /// maps now, what removing it alone would free.
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
        SnapshotCmd::List { filters, json } => list(&mut c, filters, *json)?,
        SnapshotCmd::Tree { json } => tree(&mut c, *json)?,
        SnapshotCmd::Info { key, json } => info(&mut c, key, *json)?,
        SnapshotCmd::Prepare {
            key,
            parent,
            labels,
        } => {
            let parent = parent.as_deref().unwrap_or("");
            let m = c.create(false, key, parent, parse_labels(labels)?)?;
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
        SnapshotCmd::Mount { key, path } => mount(&mut c, key, path)?,
        SnapshotCmd::Umount { path } => umount(&mut c, path)?,
        SnapshotCmd::Rm { keys } => {
            for k in keys {
                remove(&mut c, k)?;
                println!("removed {k}");
            }
        }
        SnapshotCmd::Usage { keys, json } => usage(&mut c, keys, *json)?,
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

/// `thinsnap snapshot list`.
fn list(c: &mut Client, filters: &[String], json: bool) -> Result<()> {
    let mut infos = c.list(filters.to_vec())?;
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    if json {
        let v: Vec<_> = infos.iter().map(info_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
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
    Ok(())
}

/// `thinsnap snapshot tree`: every snapshot under its parent.
fn tree(c: &mut Client, json: bool) -> Result<()> {
    let infos = c.list(vec![])?;
    let mut children: BTreeMap<String, Vec<&Info>> = BTreeMap::new();
    for i in &infos {
        children.entry(i.parent.clone()).or_default().push(i);
    }
    for v in children.values_mut() {
        v.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let roots = children.get("").map(Vec::as_slice).unwrap_or_default();
    if json {
        fn node(i: &Info, ch: &BTreeMap<String, Vec<&Info>>) -> serde_json::Value {
            let kids: Vec<_> = ch
                .get(&i.name)
                .map(|v| v.iter().map(|c| node(c, ch)).collect())
                .unwrap_or_default();
            json!({"name": i.name, "kind": kind(i), "children": kids})
        }
        let v: Vec<_> = roots.iter().map(|i| node(i, &children)).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    fn draw(i: &Info, ch: &BTreeMap<String, Vec<&Info>>, prefix: &str, last: bool, root: bool) {
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
            let prefix = format!("{prefix}{next}");
            draw(k, ch, &prefix, n + 1 == kids.len(), false);
        }
    }
    for root in roots {
        draw(root, &children, "", true, true);
    }
    Ok(())
}

/// `thinsnap snapshot info KEY`.
fn info(c: &mut Client, key: &str, json: bool) -> Result<()> {
    let i = c.stat(key)?;
    let u = c
        .snapshot_usage(&[key.to_string()])?
        .pop()
        .context("the daemon answered no usage")?;
    let mounts = if i.kind == 3 { vec![] } else { c.mounts(key)? };
    if json {
        let mut v = info_json(&i);
        v["usage"] = json!({"exclusive_bytes": u.exclusive_bytes,
            "mapped_bytes": u.mapped_bytes, "exclusive_now_bytes": u.exclusive_now_bytes,
            "inodes": u.inodes});
        v["mounts"] = json!(mounts
            .iter()
            .map(|m| json!({"type": m.r#type, "source": m.source, "options": m.options}))
            .collect::<Vec<_>>());
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("name     {}", i.name);
    println!("kind     {}", kind(&i));
    println!("parent   {}", i.parent);
    println!("created  {}", time(&i.created_at));
    println!("updated  {}", time(&i.updated_at));
    println!(
        "usage    {} exclusive, {} mapped, {} freeable, {} inodes",
        format_size(u.exclusive_bytes),
        format_size(u.mapped_bytes),
        format_size(u.exclusive_now_bytes),
        u.inodes
    );
    for (k, v) in i.labels.iter().collect::<BTreeMap<_, _>>() {
        println!("label    {k}={v}");
    }
    for m in &mounts {
        println!("mount    {} {} {}", m.r#type, m.source, m.options.join(","));
    }
    Ok(())
}

/// `thinsnap snapshot mount KEY PATH`: an active snapshot or view as it is, a committed
/// one through a read-only view made for it.
fn mount(c: &mut Client, key: &str, path: &Path) -> Result<()> {
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("mount point {} does not exist", path.display()))?;
    let i = c.stat(key)?;
    if i.kind != 3 {
        mount_at(&c.mounts(key)?, &path)?;
        println!("{key} ({}) mounted at {}", kind(&i), path.display());
        return Ok(());
    }
    let view = format!("inspect:{}:{}", key, path.display());
    let mut l = HashMap::new();
    l.insert(INSPECT_LABEL.to_string(), path.display().to_string());
    let m = c.create(true, &view, key, l)?;
    if let Err(e) = mount_at(&m, &path) {
        let _ = c.remove(&view);
        return Err(e);
    }
    println!("{key} (committed) mounted read-only at {}", path.display());
    Ok(())
}

/// `thinsnap snapshot umount PATH`, removing the view `mount` made for it.
fn umount(c: &mut Client, path: &Path) -> Result<()> {
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
    Ok(())
}

/// `thinsnap snapshot usage [KEY...]`.
fn usage(c: &mut Client, keys: &[String], json: bool) -> Result<()> {
    let keys: Vec<String> = if keys.is_empty() {
        let mut v: Vec<String> = c.list(vec![])?.into_iter().map(|i| i.name).collect();
        v.sort();
        v
    } else {
        keys.to_vec()
    };
    let rows = c.snapshot_usage(&keys)?;
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|u| {
                json!({"name": u.key, "exclusive_bytes": u.exclusive_bytes,
                    "mapped_bytes": u.mapped_bytes, "exclusive_now_bytes": u.exclusive_now_bytes,
                    "inodes": u.inodes})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let r: Vec<Vec<String>> = rows
        .iter()
        .map(|u| {
            vec![
                u.key.clone(),
                format_size(u.exclusive_bytes),
                format_size(u.mapped_bytes),
                format_size(u.exclusive_now_bytes),
                u.inodes.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["NAME", "EXCLUSIVE", "MAPPED", "FREEABLE", "INODES"], &r)
    );
    Ok(())
}

/// Removes snapshot `key`; one that is kept from containerd's garbage collector
/// ([`KEEP_LABEL`], a snapshot the migration from Docker adopted) loses the label first, and
/// gets it back if the removal fails (children, a mount).
fn remove(c: &mut Client, key: &str) -> Result<()> {
    let kept = c.stat(key)?.labels.get(KEEP_LABEL).cloned();
    let Some(why) = kept else {
        return c.remove(key);
    };
    let path = vec![format!("labels.{KEEP_LABEL}")];
    c.update(key, HashMap::new(), path.clone())?;
    c.remove(key).inspect_err(|_| {
        let label = HashMap::from([(KEEP_LABEL.to_string(), why)]);
        if let Err(e) = c.update(key, label, path) {
            eprintln!("warning: {key} is no longer kept from containerd's garbage collector ({KEEP_LABEL}): {e:#}");
        }
    })
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
