//! The connections to Redis: the background one made at start, the request path's own, and
//! calls through either within the timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, RedisResult, Script, ScriptInvocation, ServerErrorKind};

use super::seed::SEED_SCRIPT;
use super::{ADMIT_SCRIPT, REFUND_SCRIPT, RedisCounters, SHARE_SCRIPT};
use crate::config::{Redis, RedisNodes};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the connection waits for an answer before it counts as broken.
const CONNECTION_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first and the longest wait between two attempts at the near connection.
const NEAR_RETRY_MIN: Duration = Duration::from_millis(250);
const NEAR_RETRY_MAX: Duration = Duration::from_secs(10);

/// A connection to the counters: one server (reconnecting by itself) or a cluster.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connection::Single(_) => "Connection::Single",
            Connection::Cluster(_) => "Connection::Cluster",
        })
    }
}

impl Connection {
    async fn invoke<T: redis::FromRedisValue>(
        self,
        invocation: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            Connection::Single(mut connection) => invocation.invoke_async(&mut connection).await,
            Connection::Cluster(mut connection) => invocation.invoke_async(&mut connection).await,
        }
    }

    /// Runs `command`, an `EVALSHA` of `script`; loads the script and runs it again when Redis
    /// lacks it (`NOSCRIPT`: Redis restarted), as a [`ScriptInvocation`] does.
    async fn eval<T: redis::FromRedisValue>(
        self,
        command: Cmd,
        script: Arc<Script>,
    ) -> RedisResult<T> {
        async fn run<T: redis::FromRedisValue>(
            connection: &mut impl redis::aio::ConnectionLike,
            command: &Cmd,
            script: &Script,
        ) -> RedisResult<T> {
            match command.query_async(connection).await {
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    script.load_async(connection).await?;
                    command.query_async(connection).await
                }
                answer => answer,
            }
        }
        match self {
            Connection::Single(mut connection) => run(&mut connection, &command, &script).await,
            Connection::Cluster(mut connection) => run(&mut connection, &command, &script).await,
        }
    }

    /// Sends a `PING` (to every master of a cluster this connection is connected to).
    pub(super) async fn ping(&self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self.clone() {
            Connection::Single(mut connection) => ping.query_async(&mut connection).await,
            Connection::Cluster(mut connection) => ping.query_async(&mut connection).await,
        }
    }

    /// [`ping`](Self::ping), sent in a cluster to each master the cluster names (`CLUSTER
    /// SLOTS`), one by one: a master this connection has lost is then an error
    /// (`ClusterConnectionNotFound`, or the I/O error of a connection found broken), where a
    /// `PING` to every master skips it.
    pub(super) async fn ping_every_master(&self) -> RedisResult<()> {
        let Connection::Cluster(connection) = self else {
            return self.ping().await;
        };
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut connection.clone())
            .await?;
        let pings = masters(slots).into_iter().map(|(host, port)| {
            let mut connection = connection.clone();
            async move {
                let at = SingleNodeRoutingInfo::ByAddress { host, port };
                connection
                    .route_command(redis::cmd("PING"), RoutingInfo::SingleNode(at))
                    .await
            }
        });
        futures_util::future::join_all(pings)
            .await
            .into_iter()
            .try_for_each(|answer| answer.map(drop))
    }
}

/// The masters' addresses in an answer to `CLUSTER SLOTS` (each range's first node), once each;
/// a node whose address is not given (empty, `?`, or a wildcard such as `0.0.0.0`, which
/// redis-rs takes as the answering node's) is left out.
fn masters(slots: redis::Value) -> Vec<(String, u16)> {
    let mut masters: Vec<(String, u16)> = Vec::new();
    let redis::Value::Array(ranges) = slots else {
        return masters;
    };
    for range in ranges {
        let redis::Value::Array(range) = range else {
            continue;
        };
        let Some(redis::Value::Array(node)) = range.into_iter().nth(2) else {
            continue;
        };
        let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
            (node.first(), node.get(1))
        else {
            continue;
        };
        let host = String::from_utf8_lossy(host).into_owned();
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        let unnamed = host.is_empty()
            || host == "?"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified());
        if unnamed || masters.contains(&(host.clone(), port)) {
            continue;
        }
        masters.push((host, port));
    }
    masters
}

/// Which connection a call went through: [`VIA_BACKGROUND`], or the request path's own, by the
/// order it was made in. Redis runs the calls of one connection in the order they were sent,
/// and nothing is known of the order of calls on two.
pub type Via = u64;
/// The background connection's [`Via`].
pub const VIA_BACKGROUND: Via = 0;
/// Request path connections made so far in this process.
static NEAR_MADE: AtomicU64 = AtomicU64::new(0);

/// A call that timed out, still on its way: it ends when Redis answers it or the connection
/// gives up on it (5 s); `O`, what it comes to.
pub type Late<O> = Pin<Box<dyn Future<Output = O> + Send>>;
/// A [`Late`] call as the connection hands it back.
pub type LateCall<T> = Late<RedisResult<T>>;

/// A call that got no answer in time: why, which connection it went through, and, when it
/// timed out, the call itself, still on its way, coming to `O`.
pub struct Unanswered<O> {
    pub failure: Failure,
    pub via: Via,
    pub late: Option<Late<O>>,
}

impl<O: 'static> Unanswered<O> {
    /// The same, with what the late call comes to turned by `then`.
    pub fn map_late<P>(self, then: impl FnOnce(O) -> P + Send + 'static) -> Unanswered<P> {
        Unanswered {
            failure: self.failure,
            via: self.via,
            late: self
                .late
                .map(|late| -> Late<P> { Box::pin(async move { then(late.await) }) }),
        }
    }
}

impl<O> std::fmt::Debug for Unanswered<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unanswered")
            .field("failure", &self.failure)
            .field("via", &self.via)
            .field("late", &self.late.is_some())
            .finish()
    }
}

/// Why a call was not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection yet, or still within `retry_after` of a failure.
    Unavailable,
    /// No answer within the timeout: Redis may still run the call.
    Timeout,
    /// The connection broke during the call: Redis may have run it.
    Error,
    /// Refused without running: an error reply, or no connection to be had.
    Refused,
}

impl Failure {
    /// Whether Redis may have run (or may still run) the call.
    pub fn may_have_run(self) -> bool {
        matches!(self, Self::Timeout | Self::Error)
    }
}

/// The request path's own connection, and the making of it.
#[derive(Debug, Default)]
pub(super) struct Near {
    made: ArcSwapOption<Made>,
    /// Whether an attempt at making it runs (one at a time).
    trying: AtomicBool,
    /// When the next attempt may start.
    retry: Mutex<Retry>,
}

impl Near {
    fn retry(&self) -> std::sync::MutexGuard<'_, Retry> {
        self.retry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection, when made and its runtime still runs.
    pub(super) fn alive(&self) -> Option<Arc<Made>> {
        self.made
            .load_full()
            .filter(|made| !made.runtime.is_finished())
    }

    fn is_alive(&self) -> bool {
        self.alive().is_some()
    }

    /// Forgets `made`, found broken, unless another has replaced it already: the next request
    /// makes the connection again, on its own runtime.
    pub(super) fn forget(&self, made: &Arc<Made>) {
        let current = Some(Arc::clone(made));
        self.made.compare_and_swap(&current, None::<Arc<Made>>);
    }
}

/// A connection made on a request path's runtime.
#[derive(Debug)]
pub(super) struct Made {
    pub(super) connection: Connection,
    /// Which one it is ([`Via`]): 1 for the first made, and so on.
    via: Via,
    /// A task of that runtime that never ends by itself: finished once the runtime is gone.
    runtime: tokio::task::JoinHandle<()>,
}

impl Drop for Made {
    fn drop(&mut self) {
        self.runtime.abort();
    }
}

/// When the next attempt at the near connection may start, and the wait before it.
#[derive(Debug)]
struct Retry {
    at: Instant,
    delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            at: Instant::now(),
            delay: Duration::ZERO,
        }
    }
}

/// Marks the end of an attempt at the near connection when dropped, also when its task is
/// dropped unfinished (its runtime shutting down).
struct Trying(Arc<Near>);

impl Drop for Trying {
    fn drop(&mut self) {
        self.0.trying.store(false, Ordering::Release);
    }
}

impl RedisCounters {
    /// Connects and loads the scripts, so that the first requests do not pay for either. Until
    /// then every request is counted in process; after, a single server's connection reconnects
    /// by itself, and a cluster's follows its slots.
    pub async fn connect(&self) -> RedisResult<()> {
        let certificates = self.tls_certificates()?;
        let connection = open(&self.settings, certificates.clone()).await?;
        // Loaded everywhere up front: a script call is then one EVALSHA.
        for (script, source) in [
            (&*self.admit, ADMIT_SCRIPT),
            (&self.seed, SEED_SCRIPT),
            (&self.refund, REFUND_SCRIPT),
            (&self.share, SHARE_SCRIPT),
        ] {
            match connection.clone() {
                Connection::Single(mut c) => {
                    script.prepare_invoke().load_async(&mut c).await?;
                }
                Connection::Cluster(mut c) => {
                    let mut load = redis::cmd("SCRIPT");
                    load.arg("LOAD").arg(source);
                    c.route_command(
                        load,
                        RoutingInfo::MultiNode((
                            redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                            None,
                        )),
                    )
                    .await?;
                }
            }
        }
        self.connection.store(Some(Arc::new(connection)));
        self.up.set(1);
        let _ = self.certificates.set(certificates);
        Ok(())
    }

    /// Starts making the request path's own connection on the runtime this is called from,
    /// once the background one is made (so the scripts are loaded) and while Redis is not
    /// failing: one attempt at a time, waiting 250 ms after a failed one, doubling up to 10 s.
    /// Until it is made, and again if the runtime that made it ends, calls go through the
    /// background connection.
    pub fn connect_near(&self, now_ms: i64) {
        let near = &self.near;
        // A guard, not a count: this runs before every admission call.
        let made = near.made.load();
        if let Some(alive) = &*made {
            if !alive.runtime.is_finished() {
                return;
            }
            // Its runtime is gone, and with it whatever drove the connection. Only that one is
            // taken out: another request may have made the next already.
            near.made.compare_and_swap(&made, None::<Arc<Made>>);
        }
        let Some(certificates) = self.certificates.get() else {
            return;
        };
        // The flag before the lock: while an attempt runs, requests take no lock here.
        if self.is_failing(now_ms) || near.trying.swap(true, Ordering::Acquire) {
            return;
        }
        // From here the attempt is this call's: the flag goes down when `trying` drops, even if
        // the task is dropped before it first runs (its runtime shutting down).
        let trying = Trying(Arc::clone(near));
        // Not due yet after a failure, or made by an attempt that ended between the first look
        // and the flag.
        if Instant::now() < near.retry().at || near.is_alive() {
            return;
        }
        let settings = self.settings.clone();
        let certificates = certificates.clone();
        let near = Arc::clone(near);
        tokio::spawn(async move {
            let _trying = trying;
            match open(&settings, certificates).await {
                Ok(connection) => {
                    near.made.store(Some(Arc::new(Made {
                        connection,
                        via: NEAR_MADE.fetch_add(1, Ordering::Relaxed) + 1,
                        runtime: tokio::spawn(std::future::pending()),
                    })));
                    *near.retry() = Retry::default();
                }
                Err(error) => {
                    let mut retry = near.retry();
                    retry.delay = (retry.delay * 2).clamp(NEAR_RETRY_MIN, NEAR_RETRY_MAX);
                    retry.at = Instant::now() + retry.delay;
                    tracing::warn!(%error, retry_ms = retry.delay.as_millis() as u64, "shared counters: cannot make the request path's connection; calls go through the background one");
                }
            }
        });
    }

    /// Whether the request path's own connection is made.
    pub fn is_near(&self) -> bool {
        self.near.is_alive()
    }

    /// The certificate authorities of `tls_ca_file`, when set (a `rediss://` URL without it
    /// trusts the system's).
    fn tls_certificates(&self) -> RedisResult<Option<redis::TlsCertificates>> {
        let Some(path) = &self.settings.tls_ca_file else {
            return Ok(None);
        };
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(path)?),
        }))
    }

    /// Whether a call failed within the last `retry_after`: requests are counted in process.
    pub fn is_failing(&self, now_ms: i64) -> bool {
        now_ms < self.down_until_ms.load(Ordering::Relaxed)
    }

    /// Whether the connection is made (a call may still fail).
    pub fn is_connected(&self) -> bool {
        self.connection.load().is_some()
    }

    /// Runs `invocation` within the timeout, recording its duration or failure.
    pub(super) async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        now_ms: i64,
    ) -> Result<T, Failure> {
        let (connection, _) = self.callable(now_ms)?;
        let started = Instant::now();
        let answer =
            tokio::time::timeout(self.settings.timeout, connection.invoke(invocation)).await;
        self.answered(answer, started, now_ms)
    }

    /// [`call`](Self::call) of `command`, an `EVALSHA` of `script`, that is not dropped when it
    /// times out (but in a cluster): the call is handed back, still on its way, for the caller
    /// to follow to its end. Dropped, a call still queued for the connection's writer would never be sent
    /// (redis-rs skips a call nobody waits for), where a timeout is taken to mean that it may
    /// run. Also says which connection the call went through.
    pub(super) async fn call_to_the_end<T: redis::FromRedisValue + Send + 'static>(
        &self,
        command: Cmd,
        script: &Arc<Script>,
        now_ms: i64,
    ) -> Result<(T, Via), Unanswered<RedisResult<T>>> {
        let (connection, via) = self.callable(now_ms).map_err(|failure| Unanswered {
            failure,
            via: VIA_BACKGROUND,
            late: None,
        })?;
        // A cluster's connection sends a call again, elsewhere too, until it is answered or
        // dropped: followed, one that broke after it ran could run twice, and its order
        // against other calls is not that of its connection. Dropped as it times out.
        let followed = matches!(connection, Connection::Single(_));
        let started = Instant::now();
        let mut call: LateCall<T> = Box::pin(connection.eval::<T>(command, Arc::clone(script)));
        let answer = tokio::time::timeout(self.settings.timeout, &mut call).await;
        let timed_out = answer.is_err() && followed;
        self.answered(answer, started, now_ms)
            .map(|value| (value, via))
            .map_err(|failure| Unanswered {
                failure,
                via,
                late: timed_out.then_some(call),
            })
    }

    /// The connection a call made at `now_ms` goes through, and which: the request path's own
    /// when made, else the background one; none while Redis is failing.
    fn callable(&self, now_ms: i64) -> Result<(Connection, Via), Failure> {
        let connection = match self.near.alive() {
            Some(made) => Some((made.connection.clone(), made.via)),
            None => self
                .connection
                .load()
                .as_deref()
                .map(|connection| (connection.clone(), VIA_BACKGROUND)),
        };
        match connection.filter(|_| now_ms >= self.down_until_ms.load(Ordering::Relaxed)) {
            Some(connection) => Ok(connection),
            None => {
                self.errors.with_label_values(&["unavailable"]).inc();
                Err(Failure::Unavailable)
            }
        }
    }

    /// What a call's `answer` (or its timeout) comes to, recording its duration or failure.
    fn answered<T>(
        &self,
        answer: Result<RedisResult<T>, tokio::time::error::Elapsed>,
        started: Instant,
        now_ms: i64,
    ) -> Result<T, Failure> {
        let mut broken = false;
        let failure = match answer {
            Ok(Ok(value)) => {
                self.duration.observe(started.elapsed().as_secs_f64());
                return Ok(value);
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "redis counter call failed; counting in process");
                broken = error.is_io_error();
                if error.is_io_error() && !error.is_connection_refusal() {
                    Failure::Error
                } else {
                    Failure::Refused
                }
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.settings.timeout.as_millis() as u64,
                    "redis counter call timed out; counting in process"
                );
                Failure::Timeout
            }
        };
        let kind = if failure == Failure::Timeout {
            "timeout"
        } else {
            "error"
        };
        self.errors.with_label_values(&[kind]).inc();
        self.note_failure(now_ms.saturating_add(self.retry_after_ms()), broken);
        Err(failure)
    }

    /// `retry_after`, in ms.
    pub(super) fn retry_after_ms(&self) -> i64 {
        i64::try_from(self.settings.retry_after.as_millis()).unwrap_or(i64::MAX)
    }

    /// Counts requests in process until `until_ms` (or later, if a failure said so). `broken`:
    /// the connection broke or was refused (Redis gone: not slow, not answering with an error),
    /// so a `PING` answered ends that wait early (the probe, in `watch`).
    pub(super) fn note_failure(&self, until_ms: i64, broken: bool) {
        self.broken.store(broken, Ordering::Relaxed);
        self.down_until_ms.fetch_max(until_ms, Ordering::Relaxed);
    }
}

/// Opens a connection to the counters, driven by the runtime this is called on: one server's
/// reconnects by itself (on the runtime of the call that found it broken), a cluster's follows
/// its slots.
pub(super) async fn open(
    settings: &Redis,
    certificates: Option<redis::TlsCertificates>,
) -> RedisResult<Connection> {
    // The request path gives up after `timeout`; the connection itself waits longer, so a slow
    // answer is not mistaken for a broken connection.
    Ok(match &settings.nodes {
        RedisNodes::Single(url) => {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(CONNECTION_RESPONSE_TIMEOUT))
                // One attempt per reconnection: the next call, or the probe's `PING` every
                // 250 ms, tries again, and a call made while Redis is down learns it at once
                // (refused) rather than waiting out a backoff (a timeout, which may have run).
                .set_number_of_retries(0);
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(url.as_str(), certificates)?,
                None => redis::Client::open(url.as_str())?,
            };
            Connection::Single(ConnectionManager::new_with_config(client, config).await?)
        }
        RedisNodes::Cluster(urls) => {
            let mut builder = ClusterClient::builder(urls.iter().map(String::as_str))
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(CONNECTION_RESPONSE_TIMEOUT);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            Connection::Cluster(builder.build()?.get_async_connection().await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::masters;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"07c37dfeb235213a872192d90877d0cd55635b91".to_vec()),
        ])
    }

    fn range(start: i64, end: i64, nodes: Vec<Value>) -> Value {
        Value::Array(
            [Value::Int(start), Value::Int(end)]
                .into_iter()
                .chain(nodes)
                .collect(),
        )
    }

    #[test]
    fn each_master_of_cluster_slots_is_named_once_and_replicas_not_at_all() {
        let slots = Value::Array(vec![
            range(
                0,
                5460,
                vec![node("10.0.0.1", 7000), node("10.0.0.4", 7003)],
            ),
            range(5461, 10922, vec![node("10.0.0.2", 7001)]),
            // A master holding two ranges.
            range(10923, 12000, vec![node("10.0.0.1", 7000)]),
            // Addresses the cluster does not give.
            range(12001, 13000, vec![node("", 7004)]),
            range(13001, 14000, vec![node("?", 7005)]),
            range(14001, 14100, vec![node("0.0.0.0", 7006)]),
            range(14101, 14200, vec![node("::", 7007)]),
            range(14201, 16383, vec![]),
        ]);
        assert_eq!(
            masters(slots),
            [("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]
        );
        assert!(masters(Value::Nil).is_empty());
    }
}
