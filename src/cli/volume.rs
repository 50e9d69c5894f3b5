//! `thinsnap volume ...`: list, info, create, rm — Docker volumes, through the running
//! daemon's volume plugin socket (what `docker volume` does through dockerd) — and resize,
//! which Docker's protocol has no verb for, through the daemon's admin API.

use std::{collections::BTreeMap, process::ExitCode};

use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use super::table;
use thinsnap_core::config::Config;

use crate::service::{client::Client, plugin_client::PluginClient};
use thinpool::units;

/// `thinsnap volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// List volumes.
    #[command(alias = "ls")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one volume: size, filesystem, device, origin, mountpoint.
    Info {
        /// Volume name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a volume (as `docker volume create -d thinsnap`).
    Create {
        /// Volume name.
        name: String,
        /// Options, KEY=VALUE: size=5G, fs=ext4|xfs, from=VOLUME.
        #[arg(short = 'o', long = "opt")]
        opts: Vec<String>,
    },
    /// Grow a volume and its filesystem, online if containers have it mounted; volumes
    /// cannot shrink.
    Resize {
        /// Volume name.
        name: String,
        /// New size: 20G, 1GiB, 512M (binary units; rounded up to a MiB).
        size: String,
    },
    /// Remove volumes; refuses while containers hold one mounted.
    #[command(alias = "remove")]
    Rm {
        /// Volume names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Runs a volume command.
pub fn run(config: &Config, cmd: &VolumeCmd) -> Result<ExitCode> {
    if let VolumeCmd::Resize { name, size } = cmd {
        return resize(config, name, size);
    }
    let Some(socket) = &config.volumes.socket else {
        bail!("the volume plugin is off: set `socket` under [volumes] in the configuration (e.g. \"/run/docker/plugins/thinsnap.sock\") and restart thinsnap");
    };
    let c = PluginClient::new(socket);
    match cmd {
        VolumeCmd::List { json } => {
            let list = c.call("VolumeDriver.List", &json!({}))?;
            let mut vols = Vec::new();
            for v in list["Volumes"].as_array().into_iter().flatten() {
                let name = v["Name"].as_str().unwrap_or_default();
                // A volume removed since the list is left out.
                if let Ok(g) = c.call("VolumeDriver.Get", &json!({ "Name": name })) {
                    vols.push(g["Volume"].clone());
                }
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&vols)?);
            } else {
                let rows: Vec<Vec<String>> = vols
                    .iter()
                    .map(|v| {
                        let s = &v["Status"];
                        vec![
                            text(&v["Name"]),
                            text(&s["size"]),
                            text(&s["filesystem"]),
                            text(&s["from"]),
                            text(&v["Mountpoint"]),
                            text(&v["CreatedAt"]),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(
                        &["NAME", "SIZE", "FS", "FROM", "MOUNTPOINT", "CREATED"],
                        &rows
                    )
                );
            }
        }
        VolumeCmd::Info { name, json } => {
            let v = c.call("VolumeDriver.Get", &json!({ "Name": name }))?["Volume"].clone();
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("name        {}", text(&v["Name"]));
                println!("created     {}", text(&v["CreatedAt"]));
                println!("mountpoint  {}", text(&v["Mountpoint"]));
                for (k, val) in v["Status"].as_object().into_iter().flatten() {
                    println!("{k:<11} {}", text(val));
                }
            }
        }
        VolumeCmd::Create { name, opts } => {
            let mut o = BTreeMap::new();
            for kv in opts {
                match kv.split_once('=') {
                    Some((k, v)) if !k.is_empty() => {
                        o.insert(k.to_string(), v.to_string());
                    }
                    _ => bail!("option {kv:?} must be KEY=VALUE"),
                }
            }
            c.call("VolumeDriver.Create", &json!({ "Name": name, "Opts": o }))?;
            println!("{name}");
        }
        VolumeCmd::Resize { .. } => unreachable!("resize is handled above"),
        VolumeCmd::Rm { names } => {
            let mut failed = false;
            for n in names {
                match c.call("VolumeDriver.Remove", &json!({ "Name": n })) {
                    Ok(_) => println!("{n}"),
                    Err(e) => {
                        eprintln!("thinsnap: error: {n}: {e:#}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `thinsnap volume resize NAME SIZE`, through the daemon's admin API (the volume needs
/// no plugin socket: volumes made while it was on are kept).
fn resize(config: &Config, name: &str, size: &str) -> Result<ExitCode> {
    let mut c = Client::connect(&config.socket)?;
    let r = c.resize_volume(name, size)?;
    let (before, now) = (
        units::format_size(r.previous_size_bytes),
        units::format_size(r.size_bytes),
    );
    if r.previous_size_bytes == r.size_bytes {
        println!("{name}: {now} (already that size)");
    } else {
        println!("{name}: {before} -> {now}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON value as table text: strings bare, null empty.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}
