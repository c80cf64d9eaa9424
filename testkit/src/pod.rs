//! The worker binary run as a "pod": a child process, killed when dropped, ready when its
//! `/readyz` answers 200.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{eventually, free_loopback_addr, http_get};

/// A running worker process and the address of its HTTP server.
pub struct Pod {
    pub child: Child,
    pub http: SocketAddr,
}

/// How a pod starts: the one launcher of the worker binary for the tests, the chaos suite and
/// the bench. Its HTTP server listens on a free loopback address of its own; its output goes
/// nowhere unless [`Launch::log`] says where.
pub struct Launch {
    command: Command,
    http: SocketAddr,
}

impl Launch {
    /// `binary` (its path: `CARGO_BIN_EXE_payment-worker` where cargo builds it) with `args`
    /// (from [`crate::world::run_args`]).
    pub fn new<S: AsRef<OsStr>>(binary: &str, args: impl IntoIterator<Item = S>) -> Self {
        let http = free_loopback_addr();
        let mut command = Command::new(binary);
        command.args(args).arg("--http-addr").arg(http.to_string());
        command.stdout(Stdio::null()).stderr(Stdio::null());
        Self { command, http }
    }

    /// More arguments.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.command.args(args);
        self
    }

    /// An environment variable.
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Where its log (stderr) goes.
    pub fn log(mut self, to: impl Into<Stdio>) -> Self {
        self.command.stderr(to);
        self
    }

    /// Spawns the process and waits until it is ready.
    ///
    /// # Panics
    /// When the process cannot start or is not ready within `timeout`.
    pub async fn start(mut self, timeout: Duration) -> Pod {
        let child = self.command.kill_on_drop(true).spawn().expect("start the worker binary");
        let http = self.http;
        assert!(ready_within(http, timeout).await, "the worker at {http} never became ready");
        Pod { child, http }
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
