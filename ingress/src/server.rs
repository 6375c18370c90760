//! The listener: accepts connections under a cap, serves each with hyper's
//! HTTP/1 under connection-level timeouts, and drains on shutdown.
//!
//! Timeouts at this level (the per-request one is a tower layer, in
//! `routes`):
//! - **header read**: hyper closes a connection that has not sent a whole
//!   request head in time. It starts that clock whenever it waits for a
//!   head, so it also ends a kept-alive connection idle between requests. It
//!   needs a timer on the builder: without one it is silently off. Every
//!   answer says so in a `Keep-Alive: timeout=<n>` hint, a second under the
//!   timeout, so a client that honours it drops an idle connection before
//!   the server does, instead of sending a request into a closing socket.
//! - **idle**: a connection on which no byte moves either way for that long
//!   is closed ([`IdleTimeout`]): a client that stalls mid-body or stops
//!   reading its answer. hyper has no such timeout.
//!
//! The cap: every connection holds a semaphore permit, so at most
//! `max_connections` descriptors go to clients. When it is reached, the
//! connection that has been idle the longest (no request in flight: waiting
//! for its first head, a slowloris, or kept alive between requests; an
//! answer still being sent, an event stream's say, counts as in flight) is
//! closed to make room, as nginx reuses keep-alive connections; only when
//! every connection has a request in flight does accepting stop until one
//! finishes (backpressure: the kernel's listen backlog holds the newcomers).
//! Refusing newcomers instead would let a few thousand slow sockets lock
//! every buyer out until the header-read timeout, again and again.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::http::header;
use axum::Router;
use dropline::ops::Readiness;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::metrics::{EVICTED_CONNECTIONS, OPEN_CONNECTIONS};

/// Connection-level limits, from the config.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown`; then readiness goes false,
/// the listener closes, idle connections close, requests in flight get
/// `drain` to finish, and whatever is left is dropped.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    ready: Readiness,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let app = match keep_alive_hint(limits.header_read_timeout) {
        Some(hint) => {
            app.layer(SetResponseHeaderLayer::if_not_present(header::HeaderName::from_static("keep-alive"), hint))
        }
        None => app,
    };
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let idle = Arc::new(IdleConnections::default());
    let graceful = GracefulShutdown::new();
    // Cancelled when the drain times out: every connection still open is
    // dropped. Each connection's eviction token is a child of it.
    let abandon = CancellationToken::new();

    'accept: loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors (EMFILE) or a connection reset before
                // it was taken: back off briefly, as a tight retry loop
                // would only spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let permit = loop {
            if let Ok(permit) = permits.clone().try_acquire_owned() {
                break permit;
            }
            let woke = idle.became_idle.notified();
            match idle.evict_oldest(EVICTION_GRACE) {
                // The victim's task ends at once and gives its permit back.
                Evict::Done => tokio::select! {
                    _ = shutdown.cancelled() => break 'accept,
                    permit = permits.clone().acquire_owned() => break permit.expect("never closed"),
                },
                Evict::NotBefore(at) => tokio::select! {
                    _ = shutdown.cancelled() => break 'accept,
                    permit = permits.clone().acquire_owned() => break permit.expect("never closed"),
                    _ = tokio::time::sleep_until(at) => continue,
                },
                // Every connection is serving a request: wait for one to
                // finish it or close.
                Evict::Nothing => tokio::select! {
                    _ = shutdown.cancelled() => break 'accept,
                    permit = permits.clone().acquire_owned() => break permit.expect("never closed"),
                    _ = woke => continue,
                },
            }
        };
        let _ = stream.set_nodelay(true);
        let evict = abandon.child_token();
        let slot = Arc::new(Slot::new(idle.clone(), evict.clone()));
        let service = hyper::service::service_fn({
            let app = app.clone();
            let slot = slot.clone();
            move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(crate::peer::PeerAddr(peer));
                let busy = Busy::new(slot.clone());
                let app = app.clone();
                async move {
                    let response = app.oneshot(request.map(axum::body::Body::new)).await;
                    response.map(|r| r.map(|body| BusyBody { body, _busy: busy }))
                }
            }
        });
        let io = TokioIo::new(IdleTimeout::new(stream, limits.idle_timeout));
        let connection = graceful.watch(builder.serve_connection(io, service));
        metrics::gauge!(OPEN_CONNECTIONS.name).increment(1.0);
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            tokio::select! {
                done = connection => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended");
                    }
                }
                _ = evict.cancelled() => tracing::debug!("connection closed"),
            }
            metrics::gauge!(OPEN_CONNECTIONS.name).decrement(1.0);
        });
    }

    ready.set(false);
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain_secs = drain.as_secs(), "drain timed out; dropping open connections");
        abandon.cancel();
    }
}

/// The `Keep-Alive` hint for a kept-alive connection the server closes after
/// `idle` without a request head: whole seconds, one under it. None when
/// that leaves no second to promise.
fn keep_alive_hint(idle: Duration) -> Option<header::HeaderValue> {
    let secs = (idle.as_secs()).checked_sub(1).filter(|s| *s > 0)?;
    Some(header::HeaderValue::from_str(&format!("timeout={secs}")).expect("ASCII"))
}

/// How long a connection must have been idle before it may be closed to make
/// room. A client's request head arrives right after the connection is
/// accepted; without a grace a burst of accepts could evict a connection
/// before hyper has read the head that was already waiting in it.
const EVICTION_GRACE: Duration = Duration::from_millis(250);

/// Connections with no request in flight, oldest idle first: the ones to
/// close when the cap is reached.
#[derive(Default)]
struct IdleConnections {
    next_id: AtomicU64,
    inner: Mutex<IdleInner>,
    /// Signalled when a connection finishes a request, for an accept loop
    /// waiting on a cap where every connection was busy.
    became_idle: tokio::sync::Notify,
}

/// What [`IdleConnections::evict_oldest`] did.
#[derive(Debug, PartialEq, Eq)]
enum Evict {
    Done,
    /// The oldest idle connection may be evicted from then on.
    NotBefore(Instant),
    /// No connection is idle.
    Nothing,
}

#[derive(Default)]
struct IdleInner {
    by_age: BTreeMap<(Instant, u64), CancellationToken>,
    since: HashMap<u64, Instant>,
}

impl IdleConnections {
    fn set_idle(&self, id: u64, evict: &CancellationToken) {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(before) = inner.since.insert(id, now) {
            inner.by_age.remove(&(before, id));
        }
        inner.by_age.insert((now, id), evict.clone());
        drop(inner);
        self.became_idle.notify_one();
    }

    fn set_busy(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = inner.since.remove(&id) {
            inner.by_age.remove(&(since, id));
        }
    }

    /// Closes the connection idle the longest, if it has been idle `grace`.
    fn evict_oldest(&self, grace: Duration) -> Evict {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = inner.by_age.first_entry() else { return Evict::Nothing };
        let (since, id) = *entry.key();
        if since + grace > Instant::now() {
            return Evict::NotBefore(since + grace);
        }
        let evict = entry.remove();
        inner.since.remove(&id);
        // A request whose head arrives just now on this connection is cut
        // off with it; the client sees a reset, as from any closed
        // connection, and retries (purchases with their key).
        evict.cancel();
        metrics::counter!(EVICTED_CONNECTIONS.name).increment(1);
        Evict::Done
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().by_age.len()
    }
}

/// One connection's place in [`IdleConnections`]: idle from the start and
/// between requests, out of it while a request is served, gone with it.
struct Slot {
    id: u64,
    idle: Arc<IdleConnections>,
    evict: CancellationToken,
}

impl Slot {
    fn new(idle: Arc<IdleConnections>, evict: CancellationToken) -> Self {
        let id = idle.next_id.fetch_add(1, Ordering::Relaxed);
        idle.set_idle(id, &evict);
        Self { id, idle, evict }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.idle.set_busy(self.id);
    }
}

/// A request in flight on a connection (HTTP/1 serves one at a time).
struct Busy(Arc<Slot>);

impl Busy {
    fn new(slot: Arc<Slot>) -> Self {
        slot.idle.set_busy(slot.id);
        Self(slot)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.idle.set_idle(self.0.id, &self.0.evict);
    }
}

/// An answer's body, holding its connection busy until it is all sent: a
/// long one (an event stream) is never taken for an idle connection.
struct BusyBody {
    body: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for BusyBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A stream that fails with `TimedOut` once a read or a write has waited
/// `timeout` since the last byte moved either way.
pub struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout, deadline: Box::pin(tokio::time::sleep(timeout)) }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.timeout;
        self.deadline.as_mut().reset(next);
    }

    /// For an operation that is pending: an error once the deadline passed
    /// (the deadline's waker wakes the task to see it).
    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "connection idle too long"))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.expired(cx).map(Err),
        }
    }
}

impl<S> IdleTimeout<S> {
    /// A write's outcome: bytes moved reset the idle clock; a write that
    /// must wait fails once the connection has been idle too long.
    fn wrote(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.expired(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        this.wrote(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.expired(cx).map(Err),
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_keep_alive_hint_is_a_whole_second_under_the_header_read_timeout() {
        let hint = |ms| keep_alive_hint(Duration::from_millis(ms)).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(hint(5_000).as_deref(), Some("timeout=4"));
        assert_eq!(hint(2_999).as_deref(), Some("timeout=1"));
        assert_eq!(hint(1_999), None);
        assert_eq!(hint(100), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_where_nothing_moves_times_out_and_traffic_keeps_it_open() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = IdleTimeout::new(near, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        // Bytes every 6 s keep it open past the 10 s timeout...
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            far.write_all(b"x").await.unwrap();
            assert_eq!(stream.read(&mut buf).await.unwrap(), 1);
        }
        // ...silence closes it 10 s after the last byte.
        let started = Instant::now();
        let e = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn the_connection_idle_longest_is_evicted_after_a_grace_and_busy_ones_never() {
        let grace = Duration::from_millis(250);
        let idle = Arc::new(IdleConnections::default());
        assert_eq!(idle.evict_oldest(grace), Evict::Nothing);
        let tokens: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::new()).collect();
        let mut slots = Vec::new();
        for t in &tokens {
            slots.push(Arc::new(Slot::new(idle.clone(), t.clone())));
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let busy = Busy::new(slots[0].clone());
        assert_eq!(idle.len(), 2);
        // Just accepted: its request head may be waiting unread.
        assert!(matches!(idle.evict_oldest(grace), Evict::NotBefore(_)));
        assert!(tokens.iter().all(|t| !t.is_cancelled()));
        tokio::time::advance(grace).await;
        assert_eq!(idle.evict_oldest(grace), Evict::Done);
        assert!(!tokens[0].is_cancelled(), "a connection serving a request is not evicted");
        assert!(tokens[1].is_cancelled());
        drop(busy);
        // Slot 0 is idle again, now the most recent.
        assert_eq!(idle.evict_oldest(grace), Evict::Done);
        assert!(tokens[2].is_cancelled());
        drop(slots);
        assert_eq!(idle.len(), 0, "closed connections leave the queue");
        assert_eq!(idle.evict_oldest(grace), Evict::Nothing);
    }
}
