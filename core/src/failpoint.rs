//! The engine's named crash points. With the `failpoints` feature, `THINSNAP_FAILPOINT`
//! naming a point makes the process kill itself there (thinpool's mechanism), as the VM
//! crash tests need; in this crate's tests, [`crash_at`] makes the point unwind instead, so
//! a test can drop the engine mid-operation as a crash would and open it again.

/// Every crash point of the engine, by operation. A host test checks that this list is
/// exactly the points the engine's sources name, and the simulated-pool tests crash at each.
pub const POINTS: &[&str] = &[
    "create.after-intent",
    "create.after-message",
    "create.after-activate",
    "create.after-grow",
    "create.after-ready",
    "undo-create.after-message",
    "base.after-intent",
    "base.after-message",
    "base.after-mkfs",
    "base.after-ready",
    "undo-base.after-message",
    "commit.after-measure",
    "commit.after-deactivate",
    "commit.after-store",
    "remove.after-mark",
    "remove.after-discard",
    "remove.after-deactivate",
    "remove.after-message",
    "remove.after-store",
    "volume.after-intent",
    "volume.after-message",
    "volume.after-grow",
    "volume.after-mkfs",
    "volume.after-ready",
    "undo-volume.after-message",
    "volume-remove.after-mark",
    "volume-remove.after-discard",
    "volume-remove.after-deactivate",
    "volume-remove.after-message",
    "volume-remove.after-store",
    "volume-resize.after-intent",
    "volume-resize.after-reload",
    "volume-resize.after-grow",
    "volume-resize.after-ready",
    "volume-mount.after-mount",
    "volume-unmount.after-record",
];

#[cfg(test)]
thread_local! {
    static CRASH_AT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// What a simulated crash unwinds with.
#[cfg(test)]
#[derive(Debug)]
pub struct Crash(pub &'static str);

/// Makes crash point `name` unwind with [`Crash`] on this thread (None: no point).
#[cfg(test)]
pub fn crash_at(name: Option<&'static str>) {
    CRASH_AT.with(|c| c.set(name));
}

/// The crash point armed on this thread, to arm on a thread the engine spawns for part of
/// an operation ([`Armed::here`]); nothing outside this crate's tests.
#[derive(Clone, Copy)]
pub struct Armed(#[cfg(test)] Option<&'static str>);

impl Armed {
    /// What this thread has armed.
    pub fn current() -> Armed {
        Armed(
            #[cfg(test)]
            CRASH_AT.with(|c| c.get()),
        )
    }

    /// Arms it on this thread too.
    pub fn here(self) {
        #[cfg(test)]
        crash_at(self.0);
    }
}

/// Crash point `name`: a crash here when a test or `THINSNAP_FAILPOINT` selects it.
#[inline]
pub fn hit(name: &'static str) {
    debug_assert!(
        POINTS.contains(&name),
        "crash point {name} is not in POINTS"
    );
    #[cfg(test)]
    if CRASH_AT.with(|c| c.get()) == Some(name) {
        CRASH_AT.with(|c| c.set(None));
        std::panic::panic_any(Crash(name));
    }
    thinpool::failpoint::hit(name);
}
