//! A broker that accepts TCP and never answers (RabbitMQ out of file handles) cannot make
//! anything hang silently: a connection attempt gives up after `[broker] connect_timeout` with
//! an error that says why, leaves no socket behind, and a worker retries, logging each attempt.

use std::time::{Duration, Instant};

use warren_broker::{Broker, BrokerError, ConnectStage};
use warren_common::config::BrokerConfig;
use warren_tests::{eventually, SilentBroker, TestNamespace};

fn config(url: String, connect_timeout: Duration) -> BrokerConfig {
    BrokerConfig {
        urls: vec![url],
        connect_timeout,
        ..BrokerConfig::default()
    }
}

#[tokio::test]
async fn connecting_to_a_silent_broker_times_out_naming_the_handshake() {
    // Given a broker that takes the TCP connection and never answers
    let silent = SilentBroker::start();

    // When a client connects with a 1 s deadline
    let started = Instant::now();
    let err = Broker::connect(&config(silent.url(), Duration::from_secs(1)))
        .await
        .unwrap_err();

    // Then it fails after about that long, with a timeout in the handshake stage
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        matches!(
            err,
            BrokerError::ConnectTimeout {
                stage: ConnectStage::Handshake,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.is_connection_lost(),
        "a long-running process retries it"
    );
    // And the message names the broker (password hidden), the stage, the wait and the usual cause
    let text = err.to_string();
    for part in [
        "guest:***@127.0.0.1",
        "AMQP handshake",
        "1s",
        "open-files limit",
        "docs/deploy.md, 'Open files'",
    ] {
        assert!(text.contains(part), "{part:?} missing: {text}");
    }
    assert!(!text.contains("s3cret"), "{text}");
    // And the abandoned attempt closed its socket (lapin's connection thread ended with it)
    assert_eq!(silent.accepted(), 1);
    assert!(
        eventually(Duration::from_secs(10), || async { silent.closed() == 1 }).await,
        "the timed-out attempt left its socket open"
    );
}

#[tokio::test]
async fn an_attempt_its_caller_drops_leaves_nothing_behind() {
    // Given a connection attempt to a silent broker, with a deadline far away
    let silent = SilentBroker::start();
    let url = silent.url();
    let attempt = tokio::spawn(async move {
        let _ = Broker::connect(&config(url, Duration::from_secs(600))).await;
    });
    assert!(eventually(Duration::from_secs(10), || async { silent.accepted() == 1 }).await);

    // When its caller gives up on it (as the supervisor's tick patience does)
    attempt.abort();

    // Then its socket is closed all the same
    assert!(
        eventually(Duration::from_secs(10), || async { silent.closed() == 1 }).await,
        "the dropped attempt left its socket open"
    );
}

#[tokio::test]
async fn a_host_that_drops_the_connect_times_out_naming_the_tcp_stage() {
    // Given a listener whose accept queue is full, so the kernel drops new SYNs (as a firewall
    // that drops packets does)
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    let full = loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(stream) if queued.len() < 16 => queued.push(stream),
            Ok(_) => break false,
            Err(_) => break true,
        }
    };
    assert!(full, "the accept queue never filled");

    // When a client connects with a 1 s deadline
    let started = Instant::now();
    let url = format!("amqp://guest:guest@{addr}/%2f");
    let err = Broker::connect(&config(url, Duration::from_secs(1)))
        .await
        .unwrap_err();

    // Then it fails after about that long, naming the TCP connect
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(
        matches!(
            err,
            BrokerError::ConnectTimeout {
                stage: ConnectStage::Tcp,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("TCP connect"), "{err}");
}

#[tokio::test]
async fn nothing_listening_still_fails_at_once() {
    // Given a port where nothing listens
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    // When a client connects, with a deadline far away
    let started = Instant::now();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let err = Broker::connect(&config(url, Duration::from_secs(60)))
        .await
        .unwrap_err();

    // Then the refusal comes back at once, as itself, not as a timeout
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(matches!(err, BrokerError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("refused"), "{err}");
}

/// Writes `ns`'s config pointing at `silent` with a 1 s `connect_timeout` to `file` in its
/// folder; returns the path.
fn silent_config(ns: &TestNamespace, silent: &SilentBroker, file: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&ns.config_path).unwrap().replace(
        &format!("urls = {:?}", ns.config.broker.urls),
        &format!("url = {:?}\nconnect_timeout = \"1s\"", silent.url()),
    );
    let path = ns.dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// Lines of `log` that contain `message` and name the handshake and its usual cause.
fn attempts(log: &str, message: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(message))
        .filter(|l| l.contains("AMQP handshake") && l.contains("open-files limit"))
        .count()
}

#[tokio::test]
async fn a_worker_retries_a_silent_broker_and_logs_each_attempt() {
    // Given a worker whose broker accepts TCP and never answers, with a 1 s deadline
    let ns = TestNamespace::undeclared(crate::THREE_STEPS);
    let silent = SilentBroker::start();
    let path = silent_config(&ns, &silent, "silent.toml");

    // When it runs
    let mut worker = ns.spawn_worker_with_config(&path, &[]);

    // Then it keeps trying, one log line per attempt, each naming the cause
    let retried = eventually(Duration::from_secs(60), || async {
        attempts(&worker.log_text(), "Lost the broker; reconnecting.") >= 3
    })
    .await;
    assert!(retried, "{}", worker.log_text());
    // And the attempts it gave up on left no socket open (the last one may be under way)
    assert!(silent.accepted() >= 3);
    assert!(silent.closed() + 1 >= silent.accepted(), "{silent:?}");
    // And it still stops on a signal, mid-retry
    assert_eq!(worker.terminate(Duration::from_secs(20)), Some(0));
}

#[tokio::test]
async fn the_supervisor_logs_each_failed_connect_of_its_depth_reads() {
    // Given a supervisor (and no workers) whose broker never answers, with a 1 s deadline
    let ns = TestNamespace::undeclared(crate::THREE_STEPS);
    let silent = SilentBroker::start();
    std::fs::copy(silent_config(&ns, &silent, "silent.toml"), &ns.config_path).unwrap();

    // When it runs
    let mut sup = ns.spawn_supervisor(&[
        "--min",
        "0",
        "--max",
        "1",
        "--target-backlog",
        "10",
        "--interval",
        "300ms",
    ]);

    // Then each tick's connect attempt is a log line naming the cause
    let retried = eventually(Duration::from_secs(60), || async {
        attempts(&sup.log_text(), "Cannot connect to read queue depths") >= 2
    })
    .await;
    assert!(retried, "{}", sup.log_text());
    assert_eq!(sup.terminate(Duration::from_secs(20)), Some(0));
}
