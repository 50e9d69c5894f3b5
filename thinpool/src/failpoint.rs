//! Named crash points for crash-safety tests. Built only with the `failpoints` feature
//! (the test command enables it); otherwise [`hit`] compiles to nothing.
//!
//! When the environment variable `THINSNAP_FAILPOINT` names a point, the process kills
//! itself with SIGKILL the moment it reaches that point, exactly as a crash would: no
//! destructors, no flushing beyond what already reached the kernel.

/// Kills the process if `name` is the failpoint selected by `THINSNAP_FAILPOINT`.
#[inline]
pub fn hit(name: &'static str) {
    #[cfg(feature = "failpoints")]
    {
        if std::env::var("THINSNAP_FAILPOINT").is_ok_and(|v| v == name) {
            eprintln!("failpoint {name}: killing the process");
            // SAFETY: raising a signal at ourselves.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
