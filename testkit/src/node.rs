//! A RabbitMQ node of a test's own (its own node name, ports and data directory), started from
//! the installed `rabbitmq-server`, so a test can stop and kill it without touching the
//! machine's shared broker. Stopped, killed and removed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::tls::TestPki;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

pub struct RabbitNode {
    name: String,
    port: u16,
    dist_port: u16,
    /// The TLS listener's port, when the node has one.
    tls_port: Option<u16>,
    dir: PathBuf,
}

impl RabbitNode {
    /// Starts a fresh node and waits until it accepts AMQP connections.
    ///
    /// # Panics
    /// When the node does not start.
    pub fn start(tag: &str) -> Self {
        Self::start_with(tag, None)
    }

    /// Starts a node that also listens for AMQP over TLS with `pki`'s server certificate,
    /// and demands a client certificate signed by its CA (`verify_peer`,
    /// `fail_if_no_peer_cert`).
    ///
    /// # Panics
    /// When the node does not start.
    pub fn start_tls(tag: &str, pki: &TestPki) -> Self {
        Self::start_with(tag, Some(pki))
    }

    fn start_with(tag: &str, pki: Option<&TestPki>) -> Self {
        let port = crate::free_loopback_addr().port();
        let dist_port = crate::free_loopback_addr().port();
        let name = format!("pw-{tag}-{}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!("pw-node-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("node directory");
        let mut config = "loopback_users = none\n".to_owned();
        let tls_port = pki.map(|pki| {
            let tls_port = crate::free_loopback_addr().port();
            config.push_str(&format!(
                "listeners.ssl.default = {tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                pki.arg("ca.pem"),
                pki.arg("server.pem"),
                pki.arg("server-key.pem"),
            ));
            tls_port
        });
        std::fs::write(dir.join("rabbitmq.conf"), config).expect("node config");
        // A quorum wait queue's at-least-once dead-lettering resends what its target did not
        // confirm after this long (180 s by default): a retry dead-lettered as the work
        // queue's leader dies would arrive three minutes late, after the tests' deadlines.
        std::fs::write(
            dir.join("advanced.config"),
            "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].\n",
        )
        .expect("advanced config");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        let node = Self { name, port, dist_port, tls_port, dir };
        node.boot();
        node
    }

    /// `amqps://guest:guest@localhost:<tls port>/%2f`.
    ///
    /// # Panics
    /// When the node has no TLS listener.
    pub fn tls_uri(&self) -> String {
        let port = self.tls_port.expect("a node started with start_tls");
        format!("amqps://guest:guest@localhost:{port}/%2f")
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", self.dir.join("advanced.config"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            // The CLI tools and the node must share the Erlang cookie.
            .env("HOME", "/var/lib/rabbitmq");
        command
    }

    /// `rabbitmqctl -n <node> ARGS`.
    ///
    /// # Panics
    /// When rabbitmqctl fails.
    pub fn ctl(&self, args: &[&str]) {
        let status = self
            .command(CTL)
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .arg("-q")
            .status()
            .expect("rabbitmqctl");
        assert!(status.success(), "rabbitmqctl {args:?} failed on {}", self.name);
    }

    /// `rabbitmqctl -n <node> ARGS`, its output; `None` when it fails (the node is down).
    pub fn ctl_output(&self, args: &[&str]) -> Option<String> {
        let output = self
            .command(CTL)
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .args(["-q", "--no-table-headers"])
            .output()
            .ok()?;
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts the node detached and waits for its AMQP listener, which opens last in the boot
    /// (`rabbitmqctl await_startup` fails at once while the node has not yet registered).
    fn boot(&self) {
        self.launch();
        self.wait_for_port();
    }

    /// Starts the node's process (after [`RabbitNode::kill`]) without waiting for it: a
    /// cluster member restarted with the others waits for them before it opens its port.
    ///
    /// # Panics
    /// When `rabbitmq-server` cannot be started.
    pub fn launch(&self) {
        let status = self.command(SERVER).arg("-detached").status().expect("rabbitmq-server");
        assert!(status.success(), "rabbitmq-server did not start");
    }

    /// The Erlang node name (`pw-…@localhost`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until the node accepts AMQP connections.
    ///
    /// # Panics
    /// After two minutes without.
    pub fn wait_for_port(&self) {
        let tls = self.tls_port.map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        for _ in 0..1200 {
            if std::net::TcpStream::connect(self.addr()).is_ok()
                && tls.is_none_or(|tls| std::net::TcpStream::connect(tls).is_ok())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("node {} never opened port {}", self.name, self.port);
    }

    /// `rabbitmqctl stop_app`, then `start_app`, with `down` in between.
    pub fn restart_app(&self, down: Duration) {
        self.ctl(&["stop_app"]);
        std::thread::sleep(down);
        self.ctl(&["start_app"]);
        self.wait_for_port();
    }

    /// SIGKILL of the broker process, then a cold start on the same data directory.
    pub fn kill_and_restart(&self) {
        self.kill();
        self.boot();
    }

    /// SIGKILL of the broker process; returns once its port is closed.
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        for _ in 0..100 {
            if std::net::TcpStream::connect(self.addr()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = self.command(CTL).arg("-n").arg(&self.name).args(["stop", "-q"]).status();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
