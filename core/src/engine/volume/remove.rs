//! VolumeDriver.Remove: refused while containers hold the volume mounted; otherwise the
//! volume goes through the device lifecycle's removal (marked Removing, discarded,
//! deleted).

use tracing::{info, instrument};

use super::validate_name;
use crate::{
    engine::Engine,
    error::{Error, Result},
    store::{Owner, State},
};

impl Engine {
    /// Removes volume `name` and its data.
    ///
    /// # Errors
    /// NotFound if it does not exist; FailedPrecondition while containers hold it mounted
    /// or its device is in use (then nothing changes).
    #[instrument(level = "info", skip(self), fields(name))]
    pub fn remove_volume(&self, name: &str) -> Result<()> {
        validate_name("volume name", name)?;
        let _g = self.lock_volumes(&[name]);
        let _live = self.live(Owner::Volume(name.to_string()));
        self.remove_device(
            |tx| {
                let v = match tx.volume(name)? {
                    Some(v) if v.device.state == State::Ready => v,
                    _ => return Err(Error::NotFound(format!("volume {name:?} does not exist"))),
                };
                if !v.mounts.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot remove volume {name:?}: it is mounted at {} for {} container mount(s); stop and remove the containers using it first (`docker ps -a --filter volume={name}`)",
                        self.volume_dir(name).display(),
                        v.mounts.len()
                    )));
                }
                Ok(v)
            },
            false,
        )?;
        info!(volume = name, "removed volume");
        Ok(())
    }
}
