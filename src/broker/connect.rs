//! Reaching the broker: one node or several (a cluster's members, or several load-balancer
//! addresses), TLS material for `amqps://`, a connect timeout; and the pool that hands each
//! component a connection to whichever node answers.
//!
//! A new connection tries the nodes in turn, starting from the one that answered last (at
//! first a random one, so replicas spread over the nodes), and moves on at once when one
//! refuses or does not answer within the connect timeout.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::error_chain;

/// The longest wait for a free connection of a [`Pool`] whose connections are all in use.
pub const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A pool of connections to the broker.
pub type Pool = managed::Pool<Connector>;
/// Why the pool gave no connection.
pub type PoolError = managed::PoolError<ConnectError>;

/// One broker address: its URI (credentials included, never shown) and how it is shown.
struct Node {
    uri: AMQPUri,
    shown: String,
}

/// Certificates for TLS (`amqps://`): CAs to trust besides the public roots, and a client
/// certificate with its key. PEM, as read from the files named in the settings.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    pub ca: Option<String>,
    pub client: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    pub certificate: Vec<u8>,
    pub key: SecretString,
}

impl TlsMaterial {
    fn lapin(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self.client.as_ref().map(|client| OwnedIdentity::PKCS8 {
                pem: client.certificate.clone(),
                key: client.key.expose_secret().as_bytes().to_vec(),
            }),
            cert_chain: self.ca.clone(),
        }
    }
}

/// Where the broker is and how to reach it. Cheap to clone.
#[derive(Clone)]
pub struct BrokerAccess {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Vec<Node>,
    tls: TlsMaterial,
    connect_timeout: Duration,
    /// The node the next connection tries first.
    next: AtomicUsize,
}

impl fmt::Debug for BrokerAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerAccess").field("nodes", &self.describe()).finish_non_exhaustive()
    }
}

/// A connection and the node it goes to.
pub struct BrokerConnection {
    connection: Connection,
    node: Arc<str>,
}

impl BrokerConnection {
    /// The node, as shown in logs (no password).
    pub fn node(&self) -> &str {
        &self.node
    }
}

impl Deref for BrokerConnection {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.connection
    }
}

/// No node could be connected to.
#[derive(Debug, thiserror::Error)]
#[error("{}", .failures.join("; "))]
pub struct ConnectError {
    /// Per node: which, and why, in one line.
    failures: Vec<String>,
    /// Whether some node answered at the TCP level (so the failure came later: TLS,
    /// credentials, the handshake).
    pub answered: bool,
}

impl BrokerAccess {
    /// # Errors
    /// When a URI does not parse (the reason, never the URI), or there is none.
    pub fn new(
        uris: &[SecretString],
        tls: TlsMaterial,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let mut nodes = Vec::with_capacity(uris.len());
        for (i, uri) in uris.iter().enumerate() {
            let parsed = parse_uri(uri.expose_secret()).map_err(|reason| {
                if uris.len() > 1 {
                    format!("URI {} of {}: {reason}", i + 1, uris.len())
                } else {
                    reason
                }
            })?;
            nodes.push(Node { shown: shown(&parsed), uri: parsed });
        }
        if nodes.is_empty() {
            return Err("no URI given".into());
        }
        let first = rand::random_range(0..nodes.len());
        Ok(Self {
            inner: Arc::new(Inner { nodes, tls, connect_timeout, next: AtomicUsize::new(first) }),
        })
    }

    /// Every node, as shown in logs.
    pub fn describe(&self) -> String {
        let shown: Vec<&str> = self.inner.nodes.iter().map(|n| n.shown.as_str()).collect();
        shown.join(", ")
    }

    /// Connects to the first node that answers, trying each once.
    ///
    /// # Errors
    /// Why each node failed.
    pub async fn connect(&self, connection_name: &str) -> Result<BrokerConnection, ConnectError> {
        let nodes = &self.inner.nodes;
        let first = self.inner.next.load(Ordering::Relaxed) % nodes.len();
        let mut failures = Vec::new();
        let mut answered = false;
        for offset in 0..nodes.len() {
            let index = (first + offset) % nodes.len();
            let node = &nodes[index];
            let properties = ConnectionProperties::default()
                .with_connection_name(connection_name.to_owned().into());
            let builder = DefaultConnectionBuilder::new()
                .map_err(|e| ConnectError { failures: vec![e.to_string()], answered: false })?
                .with_uri(node.uri.clone())
                .with_properties(properties)
                .with_tls_config(self.inner.tls.lapin());
            match tokio::time::timeout(self.inner.connect_timeout, builder.connect()).await {
                Ok(Ok(connection)) => {
                    self.inner.next.store(index, Ordering::Relaxed);
                    return Ok(BrokerConnection { connection, node: node.shown.as_str().into() });
                }
                Ok(Err(e)) => {
                    answered |= !is_unreachable(&e);
                    failures.push(format!("{}: {}", node.shown, error_chain(&e)));
                }
                Err(_) => failures.push(format!(
                    "{}: no answer within {:?}",
                    node.shown, self.inner.connect_timeout
                )),
            }
        }
        Err(ConnectError { failures, answered })
    }

    /// How many nodes the URIs name.
    pub fn node_count(&self) -> usize {
        self.inner.nodes.len()
    }

    /// Whether some node answers like a broker within `timeout`: a cheap check of a broker
    /// that is down, before a full handshake. The check connects, sends the AMQP protocol
    /// header and waits for any reply (a broker answers with `connection.start`, a TLS port
    /// with an alert). An address that accepts the connection and says nothing (a load
    /// balancer whose backends are down, a hung node) has not answered: a TCP accept alone
    /// never ends the backoff.
    pub async fn answers(&self, timeout: Duration) -> bool {
        for node in &self.inner.nodes {
            let host = node.uri.authority.host.as_str();
            let port = node.uri.authority.port;
            let answers = async {
                let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
                stream.write_all(AMQP_PROTOCOL_HEADER).await.ok()?;
                let mut reply = [0_u8; 1];
                (stream.read(&mut reply).await.ok()? > 0).then_some(())
            };
            if matches!(tokio::time::timeout(timeout, answers).await, Ok(Some(()))) {
                return true;
            }
        }
        false
    }

    /// A pool of at most `max_size` connections named `connection_name`. A caller waits at
    /// most [`POOL_WAIT`] for one while all are taken.
    ///
    /// # Panics
    /// Never: the pool's settings are fixed here and valid.
    pub fn pool(&self, connection_name: &str, max_size: usize) -> Pool {
        let connector = Connector { access: self.clone(), name: connection_name.to_owned() };
        Pool::builder(connector)
            .max_size(max_size)
            .runtime(Runtime::Tokio1)
            .recycle_timeout(Some(self.inner.connect_timeout))
            .wait_timeout(Some(POOL_WAIT))
            .build()
            .expect("a pool with a runtime and a size builds")
    }
}

/// The pool's manager: connects through [`BrokerAccess`], recycles connections still open.
pub struct Connector {
    access: BrokerAccess,
    name: String,
}

impl managed::Manager for Connector {
    type Type = BrokerConnection;
    type Error = ConnectError;

    async fn create(&self) -> Result<BrokerConnection, ConnectError> {
        self.access.connect(&self.name).await
    }

    async fn recycle(
        &self,
        connection: &mut BrokerConnection,
        _: &Metrics,
    ) -> RecycleResult<ConnectError> {
        if connection.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message(format!("the connection to {} is closed", connection.node)))
        }
    }
}

/// What an AMQP 0-9-1 client sends first.
const AMQP_PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

/// A TCP-level failure: nothing answered at that address.
fn is_unreachable(error: &lapin::Error) -> bool {
    use std::io::ErrorKind;
    matches!(error.kind(), lapin::ErrorKind::IOError(e) if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::TimedOut
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::AddrNotAvailable
    ))
}

fn parse_uri(uri: &str) -> Result<AMQPUri, String> {
    uri.trim().parse::<AMQPUri>().map_err(|e| {
        // lapin's message may quote the input; keep only the reason.
        let reason = e.to_string();
        if uri.len() > 8 && reason.contains(uri.trim()) {
            "not an amqp:// or amqps:// URI".to_owned()
        } else {
            reason
        }
    })
}

/// `amqps://user@host:port (vhost v)`: the URI without its password.
fn shown(uri: &AMQPUri) -> String {
    format!(
        "{}://{}@{}:{} (vhost {})",
        match uri.scheme {
            AMQPScheme::AMQP => "amqp",
            AMQPScheme::AMQPS => "amqps",
        },
        uri.authority.userinfo.username,
        uri.authority.host,
        uri.authority.port,
        uri.vhost
    )
}

/// Splits a `RABBITMQ_URI` value into its URIs (comma-separated).
pub fn split_uris(value: &str) -> Vec<SecretString> {
    value
        .split(',')
        .map(str::trim)
        .filter(|uri| !uri.is_empty())
        .map(|uri| SecretString::from(uri.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_uris_are_shown_without_passwords() {
        let uris = split_uris(
            "amqp://u:secret@a:5672/%2f, amqps://u:secret@b:5671/prod,amqp://u:secret@c/%2f",
        );
        let access =
            BrokerAccess::new(&uris, TlsMaterial::default(), Duration::from_secs(1)).unwrap();
        let shown = access.describe();
        assert_eq!(
            shown,
            "amqp://u@a:5672 (vhost /), amqps://u@b:5671 (vhost prod), amqp://u@c:5672 (vhost /)"
        );
        assert!(!format!("{access:?}").contains("secret"));
    }

    #[test]
    fn a_bad_uri_is_named_by_position_never_quoted() {
        let uris = split_uris("amqp://u:secret@a/%2f,http://u:secret@b/");
        let error =
            BrokerAccess::new(&uris, TlsMaterial::default(), Duration::from_secs(1)).unwrap_err();
        assert!(error.starts_with("URI 2 of 2: "), "{error}");
        assert!(!error.contains("secret"), "{error}");
        assert!(BrokerAccess::new(&[], TlsMaterial::default(), Duration::from_secs(1)).is_err());
    }
}
