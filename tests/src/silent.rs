//! A "broker" that accepts TCP connections and never says a word: what a RabbitMQ out of file
//! handles looks like to a client. It keeps every socket open and counts the ones the client
//! closed, so a test can tell that a given-up attempt left nothing behind.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct SilentBroker {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
    stopping: AtomicBool,
}

impl SilentBroker {
    /// Listens on a free port of 127.0.0.1.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let counts = Arc::new(Counts::default());
        let shared = Arc::clone(&counts);
        std::thread::spawn(move || {
            for socket in listener.incoming() {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(socket) = socket else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || hold(socket, &shared));
            }
        });
        Self { addr, counts }
    }

    /// An AMQP URL pointing here.
    pub fn url(&self) -> String {
        format!("amqp://guest:s3cret@{}/%2f", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Connections the client has closed (or shut down).
    pub fn closed(&self) -> usize {
        self.counts.closed.load(Ordering::SeqCst)
    }
}

/// Reads (and ignores) whatever comes until the client closes the socket; never writes.
fn hold(mut socket: TcpStream, counts: &Counts) {
    let mut buf = [0u8; 1024];
    while matches!(socket.read(&mut buf), Ok(n) if n > 0) {}
    counts.closed.fetch_add(1, Ordering::SeqCst);
}

impl Drop for SilentBroker {
    fn drop(&mut self) {
        // Wakes the accept loop so it sees the flag and ends.
        self.counts.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}
