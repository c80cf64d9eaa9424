//! A TCP proxy that cuts and delays connections on demand, for fault tests (this machine has
//! no toxiproxy and no netem).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

struct Shared {
    upstream: SocketAddr,
    /// Bumped by `cut_all`: connections opened under an older generation close.
    generation: watch::Sender<u64>,
    /// Added before every chunk is forwarded, in microseconds.
    delay_us: AtomicU64,
    cuts: AtomicU64,
}

/// The running proxy; stops (and drops every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound address");
        let shared = Arc::new(Shared {
            upstream,
            generation: watch::channel(0).0,
            delay_us: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
        });
        let accept = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                tokio::spawn(serve(accept.clone(), client));
            }
        });
        Self { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection, both sides, at once.
    pub fn cut_all(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
        self.shared.cuts.fetch_add(1, Ordering::Relaxed);
    }

    /// Delays every forwarded chunk by `delay` (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How many times `cut_all` was called.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::Relaxed)
    }
}

async fn serve(shared: Arc<Shared>, client: TcpStream) {
    let mut generation = shared.generation.subscribe();
    let started = *generation.borrow_and_update();
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let pumps = async {
        tokio::join!(
            pump(&shared, client_read, upstream_write),
            pump(&shared, upstream_read, client_write)
        )
    };
    tokio::select! {
        _ = pumps => {}
        _ = generation.wait_for(|g| *g != started) => {}
    }
}

async fn pump(
    shared: &Shared,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = shared.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
