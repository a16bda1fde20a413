//! After start-up: confirm that this process is the one listening on every proxy address.
//!
//! Pingora binds its listeners itself, in its own threads, after our start-up code ran; when a
//! bind fails (a port picked for `:0` was taken in the meantime by another process) it panics in
//! that thread and the process would otherwise run on without a proxy listener, while the port
//! answers for someone else. This check reads the kernel's socket tables (Linux `/proc`) until
//! every proxy port is listening on a socket of this process, then logs
//! `tollgate gateway listening`; if another process holds one of the ports, it stops the gateway
//! with exit status 1.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::state::Gateway;

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
    /// Whose signal handlers must be in place before the gateway says it listens.
    pub gateway: Arc<Gateway>,
}

/// Who listens on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    ThisProcess,
    Another,
}

/// A listening socket seen in the kernel's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listening {
    address: SocketAddr,
    holder: Holder,
}

impl Listening {
    /// Whether this socket and one bound to `address` cannot both exist (so the second bind
    /// fails): same port, and the same IP or a wildcard on either side.
    fn conflicts_with(&self, address: &SocketAddr) -> bool {
        self.address.port() == address.port()
            && (self.address.ip() == address.ip()
                || self.address.ip().is_unspecified()
                || address.ip().is_unspecified())
    }
}

#[async_trait]
impl BackgroundService for ListenCheck {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let addresses: Vec<SocketAddr> = self
            .listen
            .iter()
            .chain(&self.tls_listen)
            .copied()
            .collect();
        let started = Instant::now();
        let mut taken_polls = 0;
        loop {
            let sockets = match listening_sockets() {
                Ok(sockets) => sockets,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the socket tables; listeners not verified");
                    break;
                }
            };
            let mine = |address: &SocketAddr| {
                sockets
                    .iter()
                    .any(|s| s.holder == Holder::ThisProcess && s.address == *address)
            };
            if addresses.iter().all(mine) {
                break;
            }
            let taken: Vec<String> = addresses
                .iter()
                .filter(|address| {
                    !mine(address)
                        && sockets
                            .iter()
                            .any(|s| s.holder == Holder::Another && s.conflicts_with(address))
                })
                .map(ToString::to_string)
                .collect();
            // Seen twice in a row, so a socket caught between two reads is not mistaken.
            taken_polls = if taken.is_empty() { 0 } else { taken_polls + 1 };
            if taken_polls >= 2 {
                tracing::error!(
                    "cannot listen on {}: another process holds the port",
                    taken.join(", ")
                );
                std::process::exit(1);
            }
            if started.elapsed() > PATIENCE {
                let missing: Vec<String> = addresses
                    .iter()
                    .filter(|a| !mine(a))
                    .map(ToString::to_string)
                    .collect();
                tracing::error!(
                    "cannot listen on {}: the proxy did not bind it within {PATIENCE:?}",
                    missing.join(", ")
                );
                std::process::exit(1);
            }
            tokio::time::sleep(POLL).await;
        }
        // Report listening only once SIGHUP, SIGTERM and the file watch are handled, so whoever
        // waits for this line can signal the gateway or edit its config right away.
        let wait_for_handlers = Instant::now();
        while !self.gateway.handlers_ready() && wait_for_handlers.elapsed() < PATIENCE {
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

/// Every TCP socket in LISTEN state, with whether this process holds it.
fn listening_sockets() -> std::io::Result<Vec<Listening>> {
    // The tables first, then this process's descriptors: a socket this process opens in between
    // is then either absent from the tables or present among the descriptors, never counted as
    // another process's.
    let tables: Vec<String> = ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .collect();
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
    let mut sockets = Vec::new();
    for text in &tables {
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
            let Some(address) = parse_proc_address(local) else {
                continue;
            };
            let holder = match inode.parse::<u64>() {
                Ok(inode) if own.contains(&inode) => Holder::ThisProcess,
                _ => Holder::Another,
            };
            sockets.push(Listening { address, holder });
        }
    }
    Ok(sockets)
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the address as the kernel prints
/// it, in 32-bit words of host byte order.
fn parse_proc_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..ip.len() / 8 {
        let value = u32::from_str_radix(ip.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&value.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_of_this_process_and_not_a_closed_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let sockets = listening_sockets().unwrap();
        assert!(sockets.contains(&Listening {
            address,
            holder: Holder::ThisProcess
        }));
        drop(listener);
        assert!(
            !listening_sockets()
                .unwrap()
                .iter()
                .any(|s| s.address == address)
        );
    }

    #[test]
    fn parses_the_kernel_address_format() {
        assert_eq!(
            parse_proc_address("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_address("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
    }

    #[test]
    fn conflicts_need_the_same_port_and_an_overlapping_ip() {
        let at = |address: &str| Listening {
            address: address.parse().unwrap(),
            holder: Holder::Another,
        };
        let ours: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(at("127.0.0.1:8080").conflicts_with(&ours));
        assert!(at("0.0.0.0:8080").conflicts_with(&ours));
        assert!(!at("127.0.0.2:8080").conflicts_with(&ours));
        assert!(!at("127.0.0.1:8081").conflicts_with(&ours));
    }
}
