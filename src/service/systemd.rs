//! systemd's side of `thinsnap serve`, without libsystemd: the listening sockets of socket
//! activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`; `sd_listen_fds(3)`), and
//! readiness (`READY=1`, `STOPPING=1` on `NOTIFY_SOCKET`; `sd_notify(3)`).
//!
//! With `thinsnap.socket`, systemd owns the listening socket: while thinsnap restarts,
//! connections wait in its backlog instead of being refused, so containerd's client never
//! sees the socket missing and never falls into its reconnect back-off.

use std::os::{
    fd::{FromRawFd, RawFd},
    unix::net::UnixListener,
};

use anyhow::{bail, Result};
use tracing::warn;

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// The `FileDescriptorName=` that marks the Docker volume plugin's socket.
pub const VOLUMES_NAME: &str = "volumes";

/// Listening sockets systemd passed to this process.
#[derive(Debug, Default)]
pub struct Activated {
    /// containerd's Snapshots API (any name but [`VOLUMES_NAME`]).
    pub snapshots: Option<UnixListener>,
    /// Docker's volume plugin (`FileDescriptorName=volumes`).
    pub volumes: Option<UnixListener>,
}

/// Takes the sockets systemd passed to this process, if it passed any (`LISTEN_PID` names
/// this process), and removes the variables so that programs thinsnap runs do not take
/// them for theirs. Call it before any other thread starts.
///
/// # Errors
/// When a passed descriptor is not a listening unix stream socket, or more sockets are
/// passed than thinsnap serves.
pub fn take_listeners() -> Result<Activated> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let mine = pid.and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let n: RawFd = match fds.map(|n| n.parse()) {
        Some(Ok(n)) if mine => n,
        Some(Err(_)) if mine => bail!("LISTEN_FDS is not a number: check the socket unit"),
        _ => return Ok(Activated::default()),
    };
    let names: Vec<&str> = names.split(':').collect();
    let mut out = Activated::default();
    for i in 0..n {
        let fd = FIRST_FD + i;
        check_listening_unix(fd)?;
        // SAFETY: systemd passed us this descriptor (LISTEN_PID is ours), it is open and
        // nothing else in the process owns it.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        let slot = match names.get(i as usize).copied() {
            Some(VOLUMES_NAME) => &mut out.volumes,
            _ => &mut out.snapshots,
        };
        if slot.is_some() {
            bail!(
                "systemd passed {n} sockets, more than thinsnap serves: one for containerd and, named \"{VOLUMES_NAME}\" (FileDescriptorName=), one for Docker's volume plugin"
            );
        }
        *slot = Some(listener);
    }
    Ok(out)
}

/// Refuses a descriptor that is not a listening unix stream socket.
fn check_listening_unix(fd: RawFd) -> Result<()> {
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
    };
    // SAFETY: only borrowed for the two queries below; systemd keeps it open.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let listening = getsockopt(&borrowed, sockopt::AcceptConn).unwrap_or(false);
    let unix = getsockname::<SockaddrStorage>(fd)
        .ok()
        .and_then(|a| a.family())
        == Some(AddressFamily::Unix);
    let stream = getsockopt(&borrowed, sockopt::SockType)
        .is_ok_and(|t| t == nix::sys::socket::SockType::Stream);
    if !(listening && unix && stream) {
        bail!(
            "file descriptor {fd} from systemd is not a listening unix stream socket: the socket unit must use ListenStream= with a path"
        );
    }
    Ok(())
}

/// The path a passed listener is bound to, for messages.
pub fn local_path(l: &UnixListener) -> Option<std::path::PathBuf> {
    l.local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
}

/// Tells the service manager `state` (e.g. `READY=1`) when it asked to be told
/// (`NOTIFY_SOCKET`, a path or an abstract name starting with `@`); nothing otherwise.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&target, state) {
        warn!(socket = ?target, "cannot notify the service manager of {state:?}: {e}");
    }
}

fn send(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::{ffi::OsStrExt, net::SocketAddr, net::UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(std::path::Path::new(target))?,
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_non_socket_descriptor_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        let err = check_listening_unix(f.as_raw_fd()).unwrap_err().to_string();
        assert!(err.contains("not a listening unix stream socket"), "{err}");
    }
}
