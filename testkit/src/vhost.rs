//! A virtual host per test on the local broker.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The broker the tests use: `TEST_AMQP_HOST` (default `127.0.0.1:5672`), guest/guest.
pub fn broker_host() -> String {
    std::env::var("TEST_AMQP_HOST").unwrap_or_else(|_| "127.0.0.1:5672".to_owned())
}

/// A vhost named after the test, with full permissions for `guest`; deleted on drop, with
/// everything in it.
pub struct Vhost {
    name: String,
}

impl Vhost {
    /// # Panics
    /// When `rabbitmqctl` cannot create the vhost: the tests cannot run without it.
    pub fn new(test: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pw-test-{test}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `amqp://guest:guest@127.0.0.1:5672/<vhost>`.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/{}", broker_host(), self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.name, "-q"]).status();
    }
}

/// Runs `rabbitmqctl` quietly.
///
/// # Panics
/// When it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    broker_tool("rabbitmqctl", args)
}

/// Runs `rabbitmq-diagnostics` quietly.
///
/// # Panics
/// When it fails.
pub fn rabbitmq_diagnostics(args: &[&str]) -> String {
    broker_tool("rabbitmq-diagnostics", args)
}

fn broker_tool(tool: &str, args: &[&str]) -> String {
    let output = Command::new(tool)
        .args(args)
        .arg("-q")
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed to run the tests: {e}"));
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A broker user of a test's own, with full permissions on one vhost; deleted on drop.
pub struct User {
    name: String,
    vhost: String,
}

impl User {
    /// A user named after `vhost` and `role`, whose password is its name.
    ///
    /// # Panics
    /// When `rabbitmqctl` cannot create it.
    pub fn new(vhost: &Vhost, role: &str) -> Self {
        let name = format!("{}-{role}", vhost.name());
        rabbitmqctl(&["add_user", &name, &name]);
        rabbitmqctl(&["set_permissions", "-p", vhost.name(), &name, ".*", ".*", ".*"]);
        Self { name, vhost: vhost.name().to_owned() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `amqp://<user>:<user>@127.0.0.1:5672/<vhost>`.
    pub fn uri(&self) -> String {
        format!("amqp://{0}:{0}@{1}/{2}", self.name, broker_host(), self.vhost)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_user", &self.name, "-q"]).status();
    }
}
