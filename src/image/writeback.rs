//! Writing a layer's data back while the layer is still being applied: a thread calls
//! syncfs(2) on the mounted snapshot each time another [`EVERY`] bytes of the layer were
//! read, so that the kernel writes the files already made (on another CPU) while the
//! applier makes the next ones, and the unmount after the layer has little left to write.

use std::{
    fs::File,
    os::fd::AsFd,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread::{Scope, ScopedJoinHandle},
    time::Duration,
};

use super::error::{Error, Result};

/// Layer bytes between two syncfs calls.
pub const EVERY: u64 = 32 << 20;
/// How often the thread looks at the count.
const TICK: Duration = Duration::from_millis(50);

/// The thread writing back; [`Writeback::finish`] stops it and so does dropping it (the
/// scope then waits for it).
pub struct Writeback<'scope> {
    stop: &'scope AtomicBool,
    thread: Option<ScopedJoinHandle<'scope, Result<()>>>,
}

/// Starts writing back the filesystem mounted at `dir` (on a thread of `scope`) each time
/// `count` grew by [`EVERY`]; `stop` must be false.
///
/// # Errors
/// [`Error::Io`] when `dir` cannot be opened.
pub fn spawn<'scope>(
    scope: &'scope Scope<'scope, '_>,
    dir: &Path,
    count: &'scope AtomicU64,
    stop: &'scope AtomicBool,
) -> Result<Writeback<'scope>> {
    let fd = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
    let path = dir.to_path_buf();
    let thread = scope.spawn(move || {
        let mut done = 0;
        while !stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(TICK);
            let now = count.load(Ordering::Relaxed);
            if now >= done + EVERY && !stop.load(Ordering::Relaxed) {
                nix::unistd::syncfs(fd.as_fd())
                    .map_err(|e| Error::io("write back", &path, e.into()))?;
                done = now;
            }
        }
        Ok(())
    });
    Ok(Writeback {
        stop,
        thread: Some(thread),
    })
}

impl Writeback<'_> {
    /// Stops the thread (its descriptor of the mount is closed on return).
    ///
    /// # Errors
    /// [`Error::Io`] when a syncfs failed: data of the layer could not be written.
    pub fn finish(mut self) -> Result<()> {
        let thread = self.thread.take().expect("finished once");
        self.stop.store(true, Ordering::Relaxed);
        thread.thread().unpark();
        match thread.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Writeback<'_> {
    fn drop(&mut self) {
        if let Some(t) = &self.thread {
            self.stop.store(true, Ordering::Relaxed);
            t.thread().unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finishing_or_dropping_stops_the_thread() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"data").unwrap();
        let (count, stop) = (AtomicU64::new(0), AtomicBool::new(false));
        std::thread::scope(|s| {
            let w = spawn(s, d.path(), &count, &stop).unwrap();
            count.store(3 * EVERY, Ordering::Relaxed);
            std::thread::sleep(3 * TICK);
            w.finish().unwrap();
        });
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let _w = spawn(s, d.path(), &count, &stop).unwrap();
        });
        let e = std::thread::scope(|s| {
            spawn(s, &d.path().join("missing"), &count, &stop)
                .map(|_| ())
                .unwrap_err()
        });
        assert!(e.to_string().contains("cannot open"), "{e}");
    }
}
