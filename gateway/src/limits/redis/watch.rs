//! The shared counters' background service: it connects at start, then asks Redis between
//! requests whether it answers, so that a connection Redis broke (a restart, an outage) is found
//! before a request needs it and counting returns to Redis as soon as Redis answers again, rather
//! than after `retry_after`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::RedisCounters;
use super::connection::{Connection, open};

/// How often the connections are sent a `PING`.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a `PING` may take before it counts as unanswered.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How many `PING`s in a row the background connection's credentials are refused before a new
/// connection is tried beside it.
const REMAKE_AFTER: u32 = 4;
/// The first and the longest wait between two such tries.
const REMAKE_MIN: Duration = Duration::from_secs(1);
const REMAKE_MAX: Duration = Duration::from_secs(10);

/// What became of a `PING`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pong {
    /// Answered, after this long.
    Answered(Duration),
    /// The connection broke, or connecting was refused: Redis is down, or restarted since.
    Broken(String),
    /// Redis answered with an error (such as an ACL refusing `PING`): the connection works.
    Refusing(String),
    /// Redis refused the connection's credentials (`WRONGPASS`, `NOAUTH`): a connection made
    /// again while a password was changed, which redis-rs keeps as it is.
    Unauthenticated(String),
    /// No answer within [`PROBE_TIMEOUT`]: Redis is slow, or the way to it is.
    Silent,
}

/// What a probe's `PING` over the background connection means for the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    /// Count requests in process, without trying Redis, until then (Unix ms).
    Open(i64),
    /// Redis answered within the request timeout: a wait that began with a broken connection
    /// ends now.
    End,
    /// Nothing to change: after a slow answer, none, or an error answer, requests' own calls
    /// decide (`retry_after` runs its course after a call that timed out).
    Keep,
}

/// The request path's wait after `pong`, read at `now_ms`: a broken connection opens one of
/// `retry_after_ms`, and at least until the next probe has had its time.
fn window(pong: &Pong, timeout: Duration, retry_after_ms: i64, now_ms: i64) -> Window {
    match pong {
        Pong::Answered(took) if *took <= timeout => Window::End,
        Pong::Broken(_) => {
            let next_probe = (PROBE_INTERVAL + 3 * PROBE_TIMEOUT).as_millis() as i64;
            Window::Open(now_ms.saturating_add(retry_after_ms.max(next_probe)))
        }
        Pong::Answered(_) | Pong::Refusing(_) | Pong::Unauthenticated(_) | Pong::Silent => {
            Window::Keep
        }
    }
}

/// What the probe remembers from one `PING` to the next.
#[derive(Debug, Default)]
struct Probing {
    /// `PING`s in a row the background connection's credentials were refused.
    refused: u32,
    /// When a new connection may be tried next, and the wait after that one fails.
    remake_at: Option<Instant>,
    remake_delay: Duration,
}

impl RedisCounters {
    /// Sends a `PING` over each connection, once connected:
    /// - the background connection: one Redis broke connects again on its way to failing the
    ///   `PING` (on this service's runtime, which drives it), and a second `PING` waits for
    ///   that; what its answer means for requests is [`window`];
    /// - the request path's own: one found broken is forgotten, and the next request makes it
    ///   again on its own runtime (repaired from here, it would be driven from this service's
    ///   thread, and every call would cross to it and back). Meanwhile calls go through the
    ///   background connection.
    ///
    /// A connection whose reconnection failed with an error answer (an authentication refused
    /// while a password was changed) keeps that error for good: redis-rs makes it again only
    /// after an I/O error. So when the background connection's credentials are refused for
    /// [`REMAKE_AFTER`] `PING`s in a row, a new one is made beside it, and takes its place if it
    /// answers (see [`remake`](Self::remake)); a request path's connection refused so while the
    /// background one answers is forgotten.
    ///
    /// Whether the background connection answered is `/health/ready`'s `redis_connected` and
    /// the `tollgate_redis_up` gauge. Run every `PROBE_INTERVAL` (250 ms).
    async fn probe(&self, clock: impl Fn() -> i64, probing: &mut Probing) {
        let Some(far) = self.connection.load_full() else {
            return;
        };
        let near = self.near.alive();
        let (mut far_pong, near_pong) = futures_util::join!(ping_until_made(&far), async {
            match &near {
                Some(made) => Some(ping(&made.connection).await),
                None => None,
            }
        });
        match (&near, &near_pong, &far_pong) {
            (Some(made), Some(Pong::Broken(_)), _)
            | (Some(made), Some(Pong::Unauthenticated(_)), Pong::Answered(_)) => {
                self.near.forget(made);
            }
            _ => {}
        }
        let mut remade = false;
        // Only a refusal of its credentials: an ACL refusing `PING`, or `LOADING`, leaves the
        // connection as good as a new one.
        if let Pong::Unauthenticated(error) = &far_pong {
            probing.refused += 1;
            if probing.refused >= REMAKE_AFTER
                && probing.remake_at.is_none_or(|at| Instant::now() >= at)
                && let Some(pong) = self.remake(error, probing).await
            {
                far_pong = pong;
                remade = true;
            }
        } else {
            probing.refused = 0;
        }
        let seen = self.down_until_ms.load(Ordering::Relaxed);
        let now_ms = clock();
        match window(
            &far_pong,
            self.settings.timeout,
            self.retry_after_ms(),
            now_ms,
        ) {
            Window::Open(until_ms) => self.note_failure(until_ms, true),
            // Unless a request's call failed since the `PING`s were sent. A wait after error
            // answers ends too when a new connection answers in place of the one giving them.
            Window::End
                if seen > now_ms
                    && (self.broken.load(Ordering::Relaxed) || remade)
                    && self
                        .down_until_ms
                        .compare_exchange(seen, 0, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok() =>
            {
                tracing::info!("shared counters: redis answers again; counting in redis");
            }
            Window::End | Window::Keep => {}
        }
        // In a cluster, that `PING` skips masters the connection has lost. Each master the
        // cluster names is asked on its own, for the gauge alone: the wait is left to requests'
        // calls, which reach a lost master (so making the connection to it again, and finding it
        // back) where a `PING` by address would not.
        let current = self.connection.load_full();
        let seen = match (&far_pong, current.as_deref()) {
            (Pong::Answered(_), Some(cluster @ Connection::Cluster(_))) => {
                answer(cluster.ping_every_master()).await
            }
            _ => far_pong,
        };
        let answered = matches!(seen, Pong::Answered(_));
        let was = self.up.get();
        self.up.set(i64::from(answered));
        match (&seen, was == 1) {
            (Pong::Broken(error) | Pong::Refusing(error) | Pong::Unauthenticated(error), true) => {
                tracing::warn!(%error, "shared counters: redis does not answer a ping");
            }
            (Pong::Silent, true) => tracing::warn!(
                timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                "shared counters: redis does not answer a ping in time"
            ),
            (Pong::Answered(_), false) => tracing::info!("shared counters: redis answers a ping"),
            _ => {}
        }
    }

    /// Makes a new background connection while the one in place has its credentials refused (the
    /// last error, `error`): it takes that one's place, and the request path's connection is made
    /// again, when it answers a `PING`; its `PING`'s answer then. Otherwise it is dropped, and
    /// tried again after a wait that doubles from 1 s to 10 s.
    async fn remake(&self, error: &str, probing: &mut Probing) -> Option<Pong> {
        let certificates = self.certificates.get()?.clone();
        let pong = match open(&self.settings, certificates).await {
            Ok(connection) => match ping(&connection).await {
                pong @ Pong::Answered(_) => {
                    self.connection.store(Some(Arc::new(connection)));
                    if let Some(near) = self.near.alive() {
                        self.near.forget(&near);
                    }
                    tracing::info!(
                        %error,
                        "shared counters: the connection to redis kept answering with an error; a new one answers and replaces it"
                    );
                    *probing = Probing::default();
                    return Some(pong);
                }
                pong => pong,
            },
            Err(error) => Pong::Unauthenticated(error.to_string()),
        };
        probing.remake_delay = (probing.remake_delay * 2).clamp(REMAKE_MIN, REMAKE_MAX);
        probing.remake_at = Some(Instant::now() + probing.remake_delay);
        tracing::debug!(
            ?pong,
            retry_ms = probing.remake_delay.as_millis() as u64,
            "shared counters: a new connection to redis does not answer either"
        );
        None
    }

    /// Whether Redis answered the last `PING` over the background connection, in a cluster each
    /// master on its own (before the first, whether that connection is made).
    pub fn is_answering(&self) -> bool {
        self.is_connected() && self.up.get() == 1
    }
}

/// Sends a `PING` over `connection`; when it found the connection broken, again, which waits
/// for the connection made again (or finds it refused, from an attempt made while Redis was
/// down, and makes it try again); when that one is answered, a third, whose time is the
/// round trip alone.
async fn ping_until_made(connection: &Connection) -> Pong {
    let Pong::Broken(_) = ping(connection).await else {
        return ping(connection).await;
    };
    match ping(connection).await {
        Pong::Answered(_) => ping(connection).await,
        pong => pong,
    }
}

/// Sends a `PING` over `connection`, within [`PROBE_TIMEOUT`].
async fn ping(connection: &Connection) -> Pong {
    answer(connection.ping()).await
}

/// What became of `ping`, given [`PROBE_TIMEOUT`].
async fn answer(ping: impl Future<Output = redis::RedisResult<()>>) -> Pong {
    let started = Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
        Ok(Ok(())) => Pong::Answered(started.elapsed()),
        Ok(Err(error))
            if error.is_io_error()
                || error.kind() == redis::ErrorKind::ClusterConnectionNotFound =>
        {
            Pong::Broken(error.to_string())
        }
        Ok(Err(error))
            if error.kind() == redis::ErrorKind::AuthenticationFailed
                || matches!(error.code(), Some("WRONGPASS" | "NOAUTH")) =>
        {
            Pong::Unauthenticated(error.to_string())
        }
        Ok(Err(error)) => Pong::Refusing(error.to_string()),
        Err(_) => Pong::Silent,
    }
}

/// Connects the shared counters in the background, retrying until it can, then holds its runtime
/// (which drives the connection) and probes Redis until shutdown.
#[derive(Debug)]
pub struct Connector {
    gateway: Arc<crate::state::Gateway>,
}

impl Connector {
    /// A connector for the gateway's shared counters.
    pub fn new(gateway: Arc<crate::state::Gateway>) -> Self {
        Self { gateway }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Connector {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let Some(redis) = self.gateway.limiter.redis() else {
            return;
        };
        let mut delay = Duration::from_millis(250);
        loop {
            match redis.connect().await {
                Ok(()) => {
                    tracing::info!("shared counters: connected to redis");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_ms = delay.as_millis() as u64, "shared counters: cannot connect to redis; counting in process");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        let mut probing = Probing::default();
        loop {
            tokio::select! {
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            redis
                .probe(|| self.gateway.limiter.now_ms(), &mut probing)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(50);

    #[test]
    fn a_broken_connection_opens_a_wait_that_outlasts_the_next_probe() {
        let broken = Pong::Broken("connection refused".into());
        // `retry_after` when it is the longer...
        assert_eq!(
            window(&broken, TIMEOUT, 30_000, 1_000),
            Window::Open(31_000)
        );
        // ...else until the next probe has had the time of its three `PING`s.
        assert_eq!(window(&broken, TIMEOUT, 200, 1_000), Window::Open(4_250));
    }

    #[test]
    fn only_an_answer_within_the_request_timeout_ends_the_wait() {
        let at = |ms| Pong::Answered(Duration::from_millis(ms));
        assert_eq!(window(&at(3), TIMEOUT, 1_000, 0), Window::End);
        assert_eq!(window(&at(50), TIMEOUT, 1_000, 0), Window::End);
        assert_eq!(window(&at(51), TIMEOUT, 1_000, 0), Window::Keep);
        assert_eq!(window(&Pong::Silent, TIMEOUT, 1_000, 0), Window::Keep);
        assert_eq!(
            window(&Pong::Refusing("NOPERM".into()), TIMEOUT, 1_000, 0),
            Window::Keep
        );
    }
}
