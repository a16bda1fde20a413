//! Asking Redis, between requests, whether it answers: a connection Redis broke (a restart, an
//! outage) is made again before a request needs it, and counting returns to Redis as soon as
//! Redis answers again rather than after `retry_after`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::RedisCounters;
use super::connection::Connection;

/// How often each connection is sent a `PING`.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long a `PING` may take before it counts as unanswered.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What became of one `PING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pong {
    /// Answered, after this long.
    Answered(Duration),
    /// The connection broke or was refused: Redis is down, or restarted since it was made.
    Broken,
    /// No answer within [`PROBE_TIMEOUT`]: Redis is slow, or the way to it is.
    Silent,
}

impl RedisCounters {
    /// Sends a `PING` over each connection (the background one, and the request path's when
    /// made), once connected:
    /// - a connection Redis broke connects again on its way to failing this `PING` (the
    ///   connection reconnects when a call fails), and a second `PING` waits for it, so the
    ///   next request finds it made;
    /// - a connection still broken or refused is a failure like a request's: requests are
    ///   counted in process, without trying Redis, for `retry_after` and at least until the
    ///   next probe has had its time;
    /// - once every connection answers within `timeout` after such a failure, counting returns
    ///   to Redis at once. After a request's call timed out (Redis slow, not gone), `retry_after`
    ///   runs its course: answering one `PING` fast says little of the next call.
    ///
    /// Whether Redis answered is `/health/ready`'s `redis_connected` and the
    /// `tollgate_redis_up` gauge. Run every `PROBE_INTERVAL` (250 ms).
    pub async fn probe(&self, now_ms: i64) {
        let Some(far) = self.connection.load_full() else {
            return;
        };
        let near = self.near.alive();
        let (far, near) = futures_util::join!(ping_twice(&far), async {
            match &near {
                Some(made) => Some(ping_twice(&made.connection).await),
                None => None,
            }
        });
        let pongs = [Some(far), near];
        let pongs = pongs.iter().flatten();
        let answered = pongs.clone().all(|pong| matches!(pong, Pong::Answered(_)));
        self.up.set(i64::from(answered));
        if pongs.clone().any(|pong| *pong == Pong::Broken) {
            // Until the next probe has had its time, at least: requests do not try a Redis
            // that refuses.
            let probe_ms = (PROBE_INTERVAL + PROBE_TIMEOUT).as_millis() as i64;
            self.note_failure(
                now_ms.saturating_add(self.retry_after_ms().max(probe_ms)),
                true,
            );
            return;
        }
        let fast = pongs
            .clone()
            .all(|pong| matches!(pong, Pong::Answered(took) if *took <= self.settings.timeout));
        if fast && self.broken.swap(false, Ordering::Relaxed) {
            self.down_until_ms.store(0, Ordering::Relaxed);
            tracing::info!("shared counters: redis answers again; counting in redis");
        }
    }

    /// Whether Redis answered the last `PING` over every connection (before the first, whether
    /// the background connection is made).
    pub fn is_answering(&self) -> bool {
        self.is_connected() && self.up.get() == 1
    }
}

/// Sends a `PING` over `connection`, and once more if the connection was broken: the first
/// found it broken (or refused, from an attempt made while Redis was down) and made it connect
/// again, which the second waits for.
async fn ping_twice(connection: &Connection) -> Pong {
    match ping(connection).await {
        Pong::Broken => ping(connection).await,
        pong => pong,
    }
}

/// Sends a `PING` over `connection`, within [`PROBE_TIMEOUT`].
async fn ping(connection: &Connection) -> Pong {
    let started = Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, connection.ping()).await {
        Ok(Ok(())) => Pong::Answered(started.elapsed()),
        Ok(Err(error)) => {
            tracing::debug!(%error, "shared counters: redis did not answer a ping");
            Pong::Broken
        }
        Err(_) => Pong::Silent,
    }
}
