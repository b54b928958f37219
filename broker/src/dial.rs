//! Opens one AMQP connection within a deadline: the TCP connect, then the TLS and AMQP
//! handshake. lapin has no deadline of its own, and a broker that accepts the socket but never
//! answers (one out of file handles) would otherwise hold the caller forever.
//!
//! lapin drives a connection from a thread of its own, which dropping the connect future does
//! not stop. So an attempt that is abandoned (past its deadline, or dropped by its caller) shuts
//! its socket down, and that thread ends with it: a timed-out attempt leaves nothing behind.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_rs::TokioRuntime;
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, OwnedTLSConfig, TLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use tokio::time::Instant;

use crate::error::ConnectStage;

/// Why [`dial`] failed.
#[derive(Debug)]
pub(crate) enum DialError {
    /// The deadline passed during this stage.
    TimedOut(ConnectStage),
    /// The broker or the network said no (refused, bad credentials, TLS error, ...).
    Failed(lapin::Error),
}

/// The largest frame asked for, unless the URL names one (`?frame_max=`): RabbitMQ's default,
/// so what a connection negotiates is what it was. Named up front because lapin sizes its two
/// I/O buffers (32 frames each) from it: asked for, they are allocated once and their pages
/// become resident only as data passes; left to the negotiation, lapin grows them after the
/// handshake by writing zeros, 8 MiB of resident memory per connection from the start (an idle
/// worker with three connections measured 41 MiB, not 18).
const FRAME_MAX: u32 = 131_072;

/// Where an attempt is, shared by the caller and the connecting code on lapin's thread.
#[derive(Debug)]
enum Attempt {
    Connecting,
    TcpTimedOut,
    /// TCP is up; this second handle to the socket shuts it down if the attempt is abandoned.
    Handshaking(TcpStream),
    /// Given up by the caller: a socket that connects late is closed at once.
    Abandoned,
    Open,
}

/// Shuts the socket down when dropped, unless the attempt succeeded.
struct Abandon(Arc<Mutex<Attempt>>);

impl Drop for Abandon {
    fn drop(&mut self) {
        let mut attempt = lock(&self.0);
        if let Attempt::Handshaking(socket) = &*attempt {
            // Both directions: lapin's thread reads end-of-file and stops.
            let _ = socket.shutdown(Shutdown::Both);
        }
        if !matches!(*attempt, Attempt::Open) {
            *attempt = Attempt::Abandoned;
        }
    }
}

fn lock(attempt: &Mutex<Attempt>) -> MutexGuard<'_, Attempt> {
    attempt.lock().unwrap_or_else(|e| e.into_inner())
}

/// `url` parsed, with [`FRAME_MAX`] unless it names a frame size.
fn amqp_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    Ok(uri)
}

/// Opens a connection to `url` named `name` (as the broker's connection list shows it), or
/// fails once `patience` has passed.
pub(crate) async fn dial(
    url: &str,
    name: &str,
    tls: &OwnedTLSConfig,
    patience: Duration,
) -> Result<Connection, DialError> {
    let uri = amqp_uri(url)
        .map_err(|e: String| DialError::Failed(lapin::Error::from(io::Error::other(e))))?;
    let runtime = lapin::runtime::default_runtime().map_err(DialError::Failed)?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let deadline = Instant::now() + patience;
    let attempt = Arc::new(Mutex::new(Attempt::Connecting));
    let abandon = Abandon(Arc::clone(&attempt));
    let shared = Arc::clone(&attempt);
    let tls = tls.clone();
    // Runs on lapin's thread, so it has a deadline of its own: nothing outside can stop it.
    let connect = async move |uri: AMQPUri, runtime: TokioRuntime| {
        let plain = AMQPUri {
            scheme: AMQPScheme::AMQP,
            ..uri.clone()
        };
        let tcp = plain.connect_with_config_async(TLSConfig::default(), &runtime);
        let Ok(stream) = tokio::time::timeout_at(deadline, tcp).await else {
            let mut attempt = lock(&shared);
            if matches!(*attempt, Attempt::Connecting) {
                *attempt = Attempt::TcpTimedOut;
            }
            return Err(io::Error::from(io::ErrorKind::TimedOut).into());
        };
        let stream = stream?;
        let socket = match &stream {
            AsyncTcpStream::Plain(s) => TcpStream::from(s.get_ref().as_fd().try_clone_to_owned()?),
            _ => return Err(io::Error::other("expected a plain TCP stream").into()),
        };
        {
            let mut attempt = lock(&shared);
            match *attempt {
                Attempt::Abandoned => {
                    return Err(io::Error::from(io::ErrorKind::ConnectionAborted).into())
                }
                Attempt::Connecting => *attempt = Attempt::Handshaking(socket),
                // Only the first connect of the connection is watched.
                _ => {}
            }
        }
        match uri.scheme {
            AMQPScheme::AMQPS => Ok(stream.into_tls(&uri.authority.host, tls.as_ref()).await?),
            AMQPScheme::AMQP => Ok(stream),
        }
    };
    let connecting = Connection::connector(uri, runtime, connect, properties);
    let stage_reached = || match *lock(&attempt) {
        Attempt::Connecting | Attempt::TcpTimedOut => ConnectStage::Tcp,
        _ => ConnectStage::Handshake,
    };
    match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(connection)) => {
            *lock(&attempt) = Attempt::Open;
            drop(abandon);
            Ok(connection)
        }
        Ok(Err(_)) if matches!(*lock(&attempt), Attempt::TcpTimedOut) => {
            Err(DialError::TimedOut(ConnectStage::Tcp))
        }
        Ok(Err(e)) => Err(DialError::Failed(e)),
        Err(_) => Err(DialError::TimedOut(stage_reached())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_size_is_asked_for_unless_the_url_names_one() {
        let asked = |url: &str| amqp_uri(url).expect("a valid URL").query.frame_max;
        assert_eq!(
            asked("amqp://guest:guest@127.0.0.1:5672/%2f"),
            Some(FRAME_MAX)
        );
        assert_eq!(
            asked("amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=8192"),
            Some(8192)
        );
        assert!(amqp_uri("http://nope").is_err());
    }
}
