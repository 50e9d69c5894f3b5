//! The engine as the services reach it. With a socket systemd holds, `thinsnap serve`
//! answers connections the moment it starts, before it has opened the pool and reconciled
//! it: a client reconnecting across a restart completes its handshake within containerd's
//! reconnect deadline, and its requests wait here until the engine is up.

use std::sync::Arc;

use thinsnap_core::Engine;
use tokio::sync::watch;
use tonic::Status;

#[derive(Clone)]
enum State {
    Starting,
    Up(Arc<Engine>),
    Failed(String),
}

/// Waits for the engine.
#[derive(Clone)]
pub struct Ready(watch::Receiver<State>);

/// Says when the engine is up, or why it will not be.
pub struct Starter(watch::Sender<State>);

/// A gate that is not open yet.
pub fn gate() -> (Starter, Ready) {
    let (tx, rx) = watch::channel(State::Starting);
    (Starter(tx), Ready(rx))
}

/// A gate open on `engine` from the start.
pub fn open(engine: Arc<Engine>) -> Ready {
    let (tx, rx) = watch::channel(State::Up(engine));
    // The receiver keeps the value; the sender is not needed again.
    drop(tx);
    Ready(rx)
}

impl Ready {
    /// The engine, once it is up.
    ///
    /// # Errors
    /// Unavailable when the daemon failed to start (and is exiting).
    pub async fn engine(&self) -> Result<Arc<Engine>, Status> {
        let mut rx = self.0.clone();
        let state = rx
            .wait_for(|s| !matches!(s, State::Starting))
            .await
            .map(|s| s.clone());
        match state {
            Ok(State::Up(e)) => Ok(e),
            Ok(State::Failed(why)) => Err(Status::unavailable(why)),
            // The last value stays readable after the sender is gone.
            Ok(State::Starting) | Err(_) => match &*self.0.borrow() {
                State::Up(e) => Ok(e.clone()),
                State::Failed(why) => Err(Status::unavailable(why.clone())),
                State::Starting => Err(Status::unavailable("thinsnap is stopping")),
            },
        }
    }
}

impl Starter {
    /// Opens the gate on `engine`.
    pub fn up(&self, engine: Arc<Engine>) {
        self.0.send_replace(State::Up(engine));
    }

    /// Fails every waiting and later request with `why`.
    pub fn failed(&self, why: String) {
        self.0.send_replace(State::Failed(why));
    }
}
