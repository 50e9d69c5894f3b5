//! Thin devices of a [`ThinPool`]: create, snapshot, activate with a size, resize,
//! deactivate, delete, and list what the pool's metadata and the kernel hold.
//!
//! Messages that change the pool's metadata (`create_thin`, `create_snap`, `delete`) are
//! committed by the kernel before the message returns; callers pair them with a transaction
//! id ([`ThinPool::set_transaction_id`]) to tell after a crash what completed.

use std::{collections::BTreeSet, path::PathBuf};

use devicemapper::{Device, DmName, DmNameBuf, Sectors, ThinStatus};
use nix::errno::Errno;
use tracing::{debug, instrument};

use crate::{
    dm::{self, RemoveMode},
    error::{Error, Hint, Result},
    metadata, names,
    names::ThinId,
    pool::ThinPool,
};

/// An active thin device: a dm device mapping one thin id of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveThin {
    /// The thin id.
    pub id: ThinId,
    /// The dm name, `thinsnap-<pool>-<id>`.
    pub name: DmNameBuf,
    /// The device number.
    pub device: Device,
    /// The device node, `/dev/dm-<minor>`.
    pub devnode: PathBuf,
    /// The device's size.
    pub size: Sectors,
}

/// Space a thin device has provisioned, from the kernel's status of the active device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinUsage {
    /// Sectors mapped to data blocks (shared blocks count for every device sharing them).
    pub mapped: Sectors,
    /// Highest mapped sector, if any.
    pub highest: Option<Sectors>,
}

/// What one status ioctl tells of an active thin device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinReading {
    /// The device number.
    pub device: Device,
    /// The device node, `/dev/dm-<minor>`.
    pub devnode: PathBuf,
    /// How many holders have it open (a mounted filesystem is one).
    pub open_count: u32,
    /// What it has provisioned.
    pub usage: ThinUsage,
}

impl ThinPool {
    /// The dm name thin device `id` of this pool has when active.
    pub fn thin_name(&self, id: ThinId) -> DmNameBuf {
        names::thin_names(&self.name, id).0
    }

    fn thin_message(&self, op: &'static str, msg: &str, id: ThinId) -> Result<()> {
        match dm::message(&self.dm_name, op, msg) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(Errno::EEXIST) => Err(Error::AlreadyExists {
                what: format!("thin id {id} in pool {}", self.name),
            }),
            Err(e) if e.errno() == Some(Errno::ENOSPC) => Err(Error::NoSpace {
                pool: self.name.to_string(),
                detail: format!("{op} {id} failed: no free metadata space"),
            }),
            Err(e) => Err(e),
        }
    }

    /// Creates an empty thin device with id `id` in the pool's metadata (not activated).
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] when the id is in use; [`Error::NoSpace`]; [`Error::Dm`].
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn create_thin(&self, id: ThinId) -> Result<()> {
        let _g = self.lock();
        self.thin_message("create_thin", &format!("create_thin {id}"), id)
    }

    /// Creates thin device `id` as a snapshot of thin device `origin`. An active origin is
    /// suspended around the message (the kernel requires it) and resumed even on failure.
    ///
    /// # Errors
    /// [`Error::AlreadyExists`] when `id` is in use; [`Error::Dm`] (ENODATA) when `origin`
    /// does not exist; [`Error::NoSpace`].
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn create_snapshot(&self, id: ThinId, origin: ThinId) -> Result<()> {
        let _g = self.lock();
        let origin_name = self.thin_name(origin);
        let active = dm::info(&origin_name)?.is_some();
        if active {
            dm::suspend(&origin_name)?;
        }
        let res = self.thin_message("create_snap", &format!("create_snap {id} {origin}"), id);
        if active {
            let resumed = dm::resume(&origin_name);
            if let Err(e) = res {
                return Err(Error::with_rollback(e, resumed));
            }
            resumed?;
        }
        res
    }

    /// Deletes thin device `id` from the pool's metadata, releasing its blocks. An active
    /// device is deactivated first. Deleting an id that does not exist is not an error.
    ///
    /// # Errors
    /// [`Error::Busy`] while the device is open; [`Error::Dm`].
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn delete_thin(&self, id: ThinId) -> Result<()> {
        self.deactivate(id, RemoveMode::Now)?;
        let _g = self.lock();
        match self.thin_message("delete", &format!("delete {id}"), id) {
            Err(e) if e.errno() == Some(Errno::ENODATA) => {
                debug!(%id, "already deleted");
                Ok(())
            }
            r => r,
        }
    }

    /// Activates thin device `id` with `size` as `thinsnap-<pool>-<id>` and returns it.
    /// An already active device is returned as is (its size is changed if it differs).
    ///
    /// # Errors
    /// [`Error::Invalid`] when a device of that name maps something else; [`Error::Dm`]
    /// (ENODATA in the kernel log) when the id does not exist in the pool.
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn activate(&self, id: ThinId, size: Sectors) -> Result<ActiveThin> {
        let (name, uuid) = names::thin_names(&self.name, id);
        let line = (
            0,
            *size,
            "thin".to_string(),
            format!("{}:{} {id}", self.device.major, self.device.minor),
        );
        let info = match dm::info(&name)? {
            Some(info) if dm::live_table(&name)?.is_none() => {
                // Ours (same name and uuid) but never resumed: a process died between
                // creating it and loading its table. Finish the activation.
                if info.uuid().map(|u| u.to_string()) != Some(uuid.to_string()) {
                    return Err(Error::invalid(
                        format!("dm device {}", &*name),
                        "it exists without a table and is not thinsnap's (its uuid differs)",
                    ));
                }
                debug!(%id, "completing a device created without a table");
                dm::reload(&name, &[line])?;
                dm::info(&name)?.ok_or_else(|| Error::NotFound {
                    what: format!("dm device {}", &*name),
                    hint: Hint(None),
                })?
            }
            Some(info) => {
                let (len, ty, params) = dm::table(&name)?;
                if ty != "thin" || params != line.3 {
                    return Err(Error::invalid(
                        format!("dm device {}", &*name),
                        format!(
                            "it is active but maps {ty} {params:?}, not thin id {id} of this pool"
                        ),
                    ));
                }
                if len != *size {
                    dm::reload(&name, &[line])?;
                }
                info
            }
            None => {
                dm::create(&name, Some(&uuid), &[line]).map_err(|e| self.explain_activate(id, e))?
            }
        };
        let device = info.device();
        Ok(ActiveThin {
            id,
            devnode: dm::dm_devnode(device)?,
            name,
            device,
            size,
        })
    }

    fn explain_activate(&self, id: ThinId, e: Error) -> Error {
        match e {
            Error::Dm {
                device,
                op,
                errno: Some(Errno::ENODATA | Errno::EINVAL),
                detail,
                ..
            } if op == "table_load" => Error::Dm {
                device,
                op,
                errno: Some(Errno::ENODATA),
                detail,
                hint: Hint(Some("the thin id may not exist in the pool (see `dmesg`)")),
            },
            e => {
                let _ = id;
                e
            }
        }
    }

    /// Changes the size of active thin device `id` (its filesystem is not touched).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the device is not active; [`Error::Dm`].
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn resize_thin(&self, id: ThinId, size: Sectors) -> Result<()> {
        let name = self.thin_name(id);
        let (_, ty, params) = dm::table(&name)?;
        if ty != "thin" {
            return Err(Error::invalid(
                format!("dm device {}", &*name),
                "is not a thin device",
            ));
        }
        dm::reload(&name, &[(0, *size, ty, params)])
    }

    /// Deactivates thin device `id`; not being active is not an error.
    ///
    /// # Errors
    /// [`Error::Busy`] while it is open (mounted) and `mode` is [`RemoveMode::Now`].
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn deactivate(&self, id: ThinId, mode: RemoveMode) -> Result<()> {
        let name = self.thin_name(id);
        dm::remove(&name, mode).map_err(|e| match e {
            Error::Busy { device, detail } => {
                let mounts = dm::info(&name)
                    .ok()
                    .flatten()
                    .and_then(|i| crate::fs::mounts_of(i.device()).ok())
                    .unwrap_or_default();
                let detail = if mounts.is_empty() {
                    detail
                } else {
                    format!(
                        "it is mounted at {}: unmount it first",
                        mounts
                            .iter()
                            .map(|m| m.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                Error::Busy { device, detail }
            }
            e => e,
        })
    }

    /// Whether thin device `id` is active.
    ///
    /// # Errors
    /// [`Error::Dm`] on failure.
    pub fn is_active(&self, id: ThinId) -> Result<bool> {
        Ok(dm::info(&self.thin_name(id))?.is_some())
    }

    /// How many holders have thin device `id` open (a mounted filesystem is one), or None
    /// when it is not active. One status ioctl.
    ///
    /// # Errors
    /// [`Error::Dm`] on failure.
    pub fn open_count(&self, id: ThinId) -> Result<Option<u32>> {
        Ok(dm::info(&self.thin_name(id))?.map(|i| i.open_count().max(0) as u32))
    }

    /// The active thin devices of this pool (by their deterministic names), with numbers.
    ///
    /// # Errors
    /// [`Error::Dm`] on failure.
    pub fn active_thins(&self) -> Result<Vec<(ThinId, DmNameBuf, Device)>> {
        Ok(dm::list()?
            .into_iter()
            .filter_map(|(name, dev)| {
                names::parse_thin_name(&self.name, &name).map(|id| (id, name, dev))
            })
            .collect())
    }

    /// Usage of active thin device `id`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when it is not active; [`Error::Invalid`] when the kernel reports
    /// the device failed.
    pub fn thin_usage(&self, id: ThinId) -> Result<ThinUsage> {
        let name = self.thin_name(id);
        let (ty, line) = dm::status(&name, true)?;
        working_usage(&name, &ty, &line)
    }

    /// Thin device `id`'s device, open count and usage in one status ioctl; None when it
    /// is not active.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the device of its name is not a working thin device;
    /// [`Error::Dm`] on failure.
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn read_active(&self, id: ThinId) -> Result<Option<ThinReading>> {
        let name = self.thin_name(id);
        let Some((info, ty, line)) = dm::status_with_info(&name)? else {
            return Ok(None);
        };
        let usage = working_usage(&name, &ty, &line)?;
        let device = info.device();
        Ok(Some(ThinReading {
            devnode: dm::dm_devnode(device)?,
            device,
            open_count: info.open_count().max(0) as u32,
            usage,
        }))
    }

    /// Every thin id the pool's metadata holds, read from a metadata snapshot; the cost
    /// grows with the number of ids, so this is for reconciliation, not hot paths.
    ///
    /// # Errors
    /// [`Error::Busy`] when someone else holds a metadata snapshot; [`Error::Io`] or
    /// [`Error::Invalid`] when the metadata cannot be read.
    pub fn thin_ids(&self) -> Result<BTreeSet<ThinId>> {
        let raw = self.with_metadata_snapshot(metadata::thin_ids)?;
        raw.into_iter().map(ThinId::new).collect()
    }

    /// Mapped and exclusive data blocks of every thin device (what `thin_ls` reports as
    /// MAPPED_BLOCKS and EXCLUSIVE_BLOCKS), read from a metadata snapshot: the kernel commits
    /// the metadata first, so this includes every write the devices completed. One read
    /// per distinct metadata node (see [`crate::usage`]): callers cache it.
    ///
    /// # Errors
    /// [`Error::Busy`] when someone else holds a metadata snapshot; [`Error::Io`] or
    /// [`Error::Invalid`] when the metadata cannot be read.
    #[instrument(level = "debug", skip(self), fields(pool = %self.name))]
    pub fn mapping_usage(&self, what: crate::usage::Count) -> Result<crate::usage::MappingUsage> {
        self.with_metadata_snapshot(|meta, root| crate::usage::read_mapping_usage(meta, root, what))
    }
}

/// The usage in the status of thin device `name` (target `ty`, status `line`).
///
/// # Errors
/// [`Error::Invalid`] unless it is a working thin device.
fn working_usage(name: &DmName, ty: &str, line: &str) -> Result<ThinUsage> {
    match (ty, line.parse::<ThinStatus>()) {
        ("thin", Ok(ThinStatus::Working(w))) => Ok(ThinUsage {
            mapped: w.nr_mapped_sectors,
            highest: w.highest_mapped_sector,
        }),
        _ => Err(Error::invalid(
            format!("thin device {name}"),
            format!("the kernel reports {ty} {line:?}, not a working thin device"),
        )),
    }
}
