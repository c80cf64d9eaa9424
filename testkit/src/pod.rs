//! The worker binary run as a "pod": a child process, killed when dropped, ready when its
//! `/readyz` answers 200.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{eventually, http_get};

/// A running worker process and the address of its HTTP server.
pub struct Pod {
    pub child: Child,
    pub http: SocketAddr,
}

impl Pod {
    /// Spawns `command` (which must make the worker listen on `http`) and waits until it is
    /// ready.
    ///
    /// # Panics
    /// When the process cannot start or is not ready within `timeout`.
    pub async fn start(mut command: Command, http: SocketAddr, timeout: Duration) -> Self {
        let child = command.kill_on_drop(true).spawn().expect("start the worker binary");
        assert!(ready_within(http, timeout).await, "the worker at {http} never became ready");
        Self { child, http }
    }
}

/// Whether the worker at `http` answers `/readyz` with 200 within `timeout`.
pub async fn ready_within(http: SocketAddr, timeout: Duration) -> bool {
    eventually(timeout, || async move {
        matches!(http_get(http, "/readyz").await, Some((200, _))).then_some(())
    })
    .await
    .is_some()
}
