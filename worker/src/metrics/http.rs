//! The HTTP endpoint of a worker or a supervisor: `/metrics` (Prometheus text), `/healthz`
//! (the process runs) and `/readyz` (the [`Exposition`] says it is ready), and the
//! `--metrics-addr` that places it.

use std::net::SocketAddr;
use std::str::FromStr;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::Exposition;

/// Where `warren-worker run` serves unless told otherwise: loopback only, so nothing is exposed
/// to the network by default.
pub(crate) const WORKER_DEFAULT_ADDR: &str = "127.0.0.1:9477";
/// Where `warren-worker supervise` serves unless told otherwise.
pub(crate) const SUPERVISOR_DEFAULT_ADDR: &str = "127.0.0.1:9478";

/// A flag value that is `off` or something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not {expected} or `off`")]
pub(crate) struct OffOrError {
    given: String,
    expected: &'static str,
}

/// Parses `off` (in any case) as `None`, else a `T`; the error says what was `expected`.
pub(crate) fn off_or<T: FromStr>(s: &str, expected: &'static str) -> Result<Option<T>, OffOrError> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| OffOrError {
        given: s.to_string(),
        expected,
    })
}

/// `--metrics-addr`: an address to listen on, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricsAddr {
    Off,
    On(SocketAddr),
}

impl FromStr for MetricsAddr {
    type Err = OffOrError;
    fn from_str(s: &str) -> Result<Self, OffOrError> {
        Ok(off_or(s, "HOST:PORT (e.g. 127.0.0.1:9477)")?.map_or(Self::Off, Self::On))
    }
}

/// The metrics address is taken or not ours to use: a set-up error.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot serve metrics on {addr}: {source} (pass --metrics-addr HOST:PORT, port 0 for any free one, or `off`)"
)]
pub(crate) struct ServeError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr` now (unless it is `off`) and serves `exposition` there in the background until
/// the process ends. Logs the bound address: with port 0 that is how to find it.
pub(crate) async fn serve_metrics(
    addr: MetricsAddr,
    exposition: &Exposition,
) -> Result<(), ServeError> {
    let MetricsAddr::On(addr) = addr else {
        return Ok(());
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    let bound = listener.local_addr().map_or(addr, |a| a);
    tracing::info!(addr = %bound, "Serving /metrics, /healthz and /readyz.");
    tokio::spawn(serve(listener, exposition.clone()));
    Ok(())
}

async fn serve(listener: TcpListener, exposition: Exposition) {
    let metrics = exposition.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        text,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = exposition.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not connected\n")
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "The metrics server stopped.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_parses_or_is_off() {
        assert_eq!("off".parse::<MetricsAddr>(), Ok(MetricsAddr::Off));
        assert_eq!("OFF".parse::<MetricsAddr>(), Ok(MetricsAddr::Off));
        for default in [WORKER_DEFAULT_ADDR, SUPERVISOR_DEFAULT_ADDR] {
            assert_eq!(
                default.parse::<MetricsAddr>(),
                Ok(MetricsAddr::On(default.parse().unwrap()))
            );
        }
        let err = "localhost".parse::<MetricsAddr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"localhost\" is not HOST:PORT (e.g. 127.0.0.1:9477) or `off`"
        );
    }

    #[test]
    fn off_or_parses_any_value() {
        assert_eq!(off_or::<u16>("Off", "a port"), Ok(None));
        assert_eq!(off_or::<u16>("9480", "a port"), Ok(Some(9480)));
        assert_eq!(
            off_or::<u16>("70000", "a port").unwrap_err().to_string(),
            "\"70000\" is not a port or `off`"
        );
    }

    #[tokio::test]
    async fn serves_the_exposition_and_its_readiness() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let exposition = Exposition::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, exposition.clone()));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        exposition.set_ready(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
    }
}
