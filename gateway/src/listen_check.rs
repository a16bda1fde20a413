//! After start-up: confirm that this process is the one listening on every proxy address.
//!
//! Pingora binds its listeners itself, in its own threads, after our start-up code ran; when a
//! bind fails (a port picked for `:0` was taken in the meantime by another process) it panics in
//! that thread and the process would otherwise run on without a proxy listener, while the port
//! answers for someone else. This check reads the kernel's socket tables (Linux `/proc`) until
//! every proxy port is listening on a socket of this process, then logs
//! `tollgate gateway listening`; if another process holds one of the ports, it stops the gateway
//! with exit status 1.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// How long Pingora gets to bind its listeners.
const PATIENCE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// The background service.
#[derive(Debug)]
pub struct ListenCheck {
    /// Plain proxy listeners.
    pub listen: Vec<SocketAddr>,
    /// TLS proxy listeners.
    pub tls_listen: Vec<SocketAddr>,
    /// The admin listener (bound before start-up ended).
    pub admin_listen: SocketAddr,
}

/// Who listens on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    ThisProcess,
    Another,
}

#[async_trait]
impl BackgroundService for ListenCheck {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let ports: Vec<u16> = self
            .listen
            .iter()
            .chain(&self.tls_listen)
            .map(SocketAddr::port)
            .collect();
        let started = Instant::now();
        loop {
            let holders = match listening_ports() {
                Ok(holders) => holders,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the socket tables; listeners not verified");
                    break;
                }
            };
            let mine = |port: &u16| {
                holders
                    .get(port)
                    .is_some_and(|h| h.contains(&Holder::ThisProcess))
            };
            if ports.iter().all(mine) {
                break;
            }
            let taken: Vec<u16> = ports
                .iter()
                .filter(|port| {
                    !mine(port)
                        && holders
                            .get(*port)
                            .is_some_and(|h| h.contains(&Holder::Another))
                })
                .copied()
                .collect();
            if !taken.is_empty() || started.elapsed() > PATIENCE {
                tracing::error!(
                    ports = ?if taken.is_empty() { ports.clone() } else { taken },
                    "cannot listen: another process holds the port, or the proxy failed to bind it"
                );
                std::process::exit(1);
            }
            tokio::time::sleep(POLL).await;
        }
        let join = |addresses: &[SocketAddr]| {
            addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        tracing::info!(
            listen = %join(&self.listen),
            tls_listen = %join(&self.tls_listen),
            admin_listen = %self.admin_listen,
            "tollgate gateway listening"
        );
    }
}

/// The TCP ports in LISTEN state, and whether a socket of this process is among their holders.
fn listening_ports() -> std::io::Result<HashMap<u16, HashSet<Holder>>> {
    let own: HashSet<u64> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let mut ports: HashMap<u16, HashSet<Holder>> = HashMap::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "0A" {
                continue;
            }
            let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
            else {
                continue;
            };
            let holder = match inode.parse::<u64>() {
                Ok(inode) if own.contains(&inode) => Holder::ThisProcess,
                _ => Holder::Another,
            };
            ports.entry(port).or_default().insert(holder);
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_of_this_process_and_not_a_closed_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let holders = listening_ports().unwrap();
        assert_eq!(holders[&port], HashSet::from([Holder::ThisProcess]));
        drop(listener);
        assert!(!listening_ports().unwrap().contains_key(&port));
    }
}
