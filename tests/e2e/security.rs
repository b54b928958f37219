//! TLS to the broker (with a private CA and a client certificate), and the AMQP password kept
//! out of errors, logs and help output.
//!
//! The local broker speaks plain AMQP, so the TLS test puts a TLS-terminating proxy in front of
//! it that trusts only client certificates of a CA made up for the test.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use warren_common::{Config, JobStatus};
use warren_producer::{Client, Job};
use warren_tests::{test_worker_bin, TestNamespace};

use crate::THREE_STEPS;

/// PEM files of a test CA, a server certificate for `localhost` and a client certificate.
struct Pki {
    server_cert: CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
    ca_cert: CertificateDer<'static>,
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = CertificateParams::new(vec!["warren-client".into()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("client.pem"), client_cert.pem()).unwrap();
    std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
    Pki {
        server_cert: server_cert.der().clone(),
        server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
        ca_cert: ca_cert.der().clone(),
    }
}

/// Listens on a free port, requires a client certificate from the test CA, and pipes each
/// TLS connection to the plain broker at `upstream`. Returns the port.
async fn tls_proxy(pki: Pki, upstream: String) -> u16 {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_cert).unwrap();
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pki.server_cert], pki.server_key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // A client without a good certificate fails here; it just gets disconnected.
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

/// The namespace's config, reaching the broker through the proxy with `tls` as `[broker.tls]`.
fn tls_config(ns: &TestNamespace, port: u16, tls: &str) -> (Config, std::path::PathBuf) {
    let text = format!(
        "[broker]\nurl = \"amqps://guest:guest@localhost:{port}/%2f\"\nnamespace = {:?}\n\n\
         [broker.tls]\n{tls}\n\n{THREE_STEPS}",
        ns.name
    );
    let path = ns.dir.join(format!("tls-{:x}.toml", rand::random::<u32>()));
    std::fs::write(&path, text).unwrap();
    let config = Config::load(Some(&path), &std::collections::HashMap::new()).unwrap();
    (config, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_worker_reach_the_broker_over_tls_with_a_client_certificate() {
    // Given a broker behind TLS that wants a client certificate from a private CA
    let ns = TestNamespace::new(THREE_STEPS).await;
    let pki = make_pki(&ns.dir);
    let port = tls_proxy(pki, "127.0.0.1:5672".into()).await;
    let full = "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"client.key\"";

    // When a worker and a producer connect with the CA and the client certificate
    let (config, path) = tls_config(&ns, port, full);
    let mut worker = ns.spawn_worker_with_config(&path, &[]);
    let client = Client::connect(config).await.expect("connect over TLS");
    let id = client
        .submit(Job::new("chain", "acme", json!({})))
        .await
        .unwrap();

    // Then the job runs through the worker and its result comes back, all over TLS
    let result = client.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.status, JobStatus::Succeeded, "{}", worker.log_text());
    assert_eq!(result.output["trail"], json!(["a", "b", "c"]));
    client.close().await;
    worker.terminate(Duration::from_secs(10));

    // When the client certificate is left out, or the CA, then connecting fails with a reason
    for (missing, tls) in [
        ("client certificate", "ca_file = \"ca.pem\""),
        (
            "CA",
            "cert_file = \"client.pem\"\nkey_file = \"client.key\"",
        ),
    ] {
        let (config, _) = tls_config(&ns, port, tls);
        let err = Client::connect(config).await.unwrap_err().to_string();
        assert!(
            err.contains("cannot connect") && err.contains("amqps://guest:***@localhost"),
            "without the {missing}: {err}"
        );
    }

    // When a file is missing, the error names its key
    let (config, _) = tls_config(&ns, port, "ca_file = \"nope.pem\"");
    let err = Client::connect(config).await.unwrap_err().to_string();
    assert!(err.contains("broker.tls.ca_file"), "{err}");
}

#[tokio::test]
async fn the_password_stays_out_of_errors_logs_and_help() {
    let ns = TestNamespace::new(THREE_STEPS).await;
    let secret = "hunter2-do-not-print";
    let url = format!("amqp://guest:{secret}@127.0.0.1:5672/%2f");
    let path = ns.dir.join("wrong-password.toml");
    std::fs::write(
        &path,
        format!(
            "[broker]\nurl = {url:?}\nnamespace = {:?}\n\n{THREE_STEPS}",
            ns.name
        ),
    )
    .unwrap();

    // A connect error from the SDK, and its Debug form
    let config = Config::load(Some(&path), &std::collections::HashMap::new()).unwrap();
    assert!(!format!("{config:?}").contains(secret));
    let err = Client::connect(config).await.unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(secret), "{text}");
        assert!(text.contains("guest:***@"), "{text}");
    }

    // A worker's log at the most verbose level, while it keeps failing to log in
    let log_path = ns.dir.join("trace.log");
    let mut worker = Command::new(test_worker_bin())
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("WARREN_AMQP_URL")
        .env("WARREN_METRICS_ADDR", "off")
        .env("WARREN_LOG", "trace")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.kill().unwrap();
    worker.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("guest:***@"), "{log}");
    assert!(!log.contains(secret), "{log}");

    // Help output, with the URL in the environment
    for args in [&["--help"][..], &["run", "--help"]] {
        let out = Command::new(test_worker_bin())
            .args(args)
            .env("WARREN_AMQP_URL", &url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage"), "{text}");
        assert!(!text.contains(secret), "{args:?}: {text}");
    }
}
