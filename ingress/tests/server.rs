//! The listener alone, on port 0 with a trivial app: slow connections past
//! the cap are closed, by eviction or at the header-read timeout, and a
//! client with a whole request is served meanwhile. No backing services.
//!
//! The bounds compare against the header-read timeout, not a latency a
//! loaded CI machine cannot promise: a whole request answered in less than
//! that timeout got its slot by eviction, not by waiting for a slow
//! connection's timer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use dropline::ops::Readiness;
use dropline_ingress::server::{serve, ConnLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const CAP: usize = 32;
const HEADER_READ: Duration = Duration::from_secs(2);

async fn start() -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", get(|| async { "ok" }));
    let limits =
        ConnLimits { header_read_timeout: HEADER_READ, idle_timeout: Duration::from_secs(5), max_connections: CAP };
    let shutdown = CancellationToken::new();
    let task =
        tokio::spawn(serve(listener, app, limits, Readiness::default(), shutdown.clone(), Duration::from_secs(2)));
    (addr, shutdown, task)
}

/// Half a request head, then silence; how long until the server hangs up.
async fn slow(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a half-sent request was never closed");
    started.elapsed()
}

/// A whole request on a new connection; how long its answer took.
async fn whole(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await.expect("answered").unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_past_the_cap_do_not_lock_out_whole_requests() {
    let (addr, shutdown, task) = start().await;
    let mut attack = tokio::task::JoinSet::new();
    for _ in 0..CAP * 2 {
        attack.spawn(slow(addr));
    }
    let mut served = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    for i in 0..12 {
        pace.tick().await;
        if i == 3 {
            for _ in 0..CAP {
                attack.spawn(slow(addr));
            }
        }
        served.push(whole(addr).await);
    }
    assert!(served.iter().all(|d| *d < HEADER_READ), "a whole request waited for a slot: {served:?}");
    let mut closed = Vec::new();
    while let Some(d) = attack.join_next().await {
        closed.push(d.unwrap());
    }
    let latest = closed.iter().max().unwrap();
    assert!(*latest < HEADER_READ * 2, "a slow connection lived {latest:?}");
    let by_timer = closed.iter().filter(|d| **d >= HEADER_READ - Duration::from_millis(100)).count();
    assert!(by_timer >= CAP / 2, "{by_timer} of {} closed by the header-read timeout", closed.len());
    shutdown.cancel();
    task.await.unwrap();
}

/// What the server answers to raw bytes on a new connection, and whether it
/// then closed the connection.
async fn answer_to(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    // read_to_end returns only once the server has closed the connection.
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Requests hyper cannot parse never reach the app, so they cannot get its
/// problem+json; hyper answers them with a bare status and closes the
/// connection, and the listener goes on serving (README, "Input is strict").
#[tokio::test]
async fn requests_hyper_cannot_parse_are_refused_with_a_status_and_closed() {
    let (addr, shutdown, task) = start().await;
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-Header-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = answer_to(addr, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "200 headers: {answer}");
    let answer = answer_to(addr, b"\x16\x03\x01 not http at all\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "garbage: {answer}");
    whole(addr).await;
    shutdown.cancel();
    task.await.unwrap();
}

/// A kept-alive connection is closed once it has sat idle between requests
/// for the header-read timeout: the ingress's keep-alive. A client that
/// pools connections must drop them sooner (dropctl and the tests drop them
/// after 2 s, under the default 5 s), or a request sent on one as it closes
/// meets a reset instead of an answer.
#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_header_read_timeout_idle() {
    let (addr, shutdown, task) = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // The hint a client that honours it closes by, before the server does.
    assert!(head.contains("\r\nkeep-alive: timeout=1\r\n"), "{head}");
    let idle_since = Instant::now();
    let end = tokio::time::timeout(HEADER_READ * 3, s.read(&mut buf)).await.expect("closed while idle");
    let idle = idle_since.elapsed();
    assert!(matches!(end, Ok(0)), "an idle kept-alive connection was not closed cleanly: {end:?}");
    assert!(idle >= HEADER_READ - Duration::from_millis(100), "closed after {idle:?} idle, before the timeout");
    shutdown.cancel();
    task.await.unwrap();
}
