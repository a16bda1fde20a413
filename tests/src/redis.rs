//! A Redis server of the test's own, on a free port, that the test may kill, restart, freeze or
//! flush without touching anyone else's.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` process; killed when dropped.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// Whether it takes TLS only (its certificates, signed by `ca.pem`, are in `dir`).
    tls: bool,
}

impl RedisServer {
    /// Starts one on a free port, keeping nothing on disk.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with further `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_new(
            tempfile::tempdir().unwrap(),
            extra.iter().map(|a| (*a).to_owned()).collect(),
            false,
        )
    }

    /// Starts one that takes TLS connections only, with a certificate for `127.0.0.1` signed by
    /// a CA of its own ([`ca_file`](Self::ca_file)).
    pub fn start_tls() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::write_ca_signed(dir.path());
        Self::start_new(dir, Vec::new(), true)
    }

    /// A port is found free, then taken by `redis-server`: a test running beside this one may
    /// take it in between, so another free port is tried until this server is the one there.
    fn start_new(dir: tempfile::TempDir, extra: Vec<String>, tls: bool) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir,
            extra,
            tls,
        };
        for _ in 0..10 {
            if server.launch() {
                return server;
            }
            server.port = free_port();
        }
        panic!("redis-server found no free port in 10 tries");
    }

    /// `redis://127.0.0.1:port`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Its address (plain TCP or TLS).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The PEM file of the CA that signed a TLS server's certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Starts it again (empty) on the same port after [`kill`](Self::kill). The port is the one
    /// gateways were given, so it is tried again while another process holds it a moment.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        for _ in 0..50 {
            if self.launch() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server could not listen on 127.0.0.1:{}", self.port);
    }

    /// Starts the process on `port`; whether it is the one answering there (its process id, in
    /// `INFO server`), rather than a process that took the port first.
    fn launch(&mut self) -> bool {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        if self.tls {
            let file = |name: &str| self.dir.path().join(name);
            command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(file("cert.pem"))
                .arg("--tls-key-file")
                .arg(file("key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(file("ca.pem"));
        } else {
            command.args(["--port", &port]);
        }
        let mut child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/services installs it)");
        let ours = format!("process_id:{}", child.id());
        let started = Instant::now();
        loop {
            if child.try_wait().ok().flatten().is_some() {
                // It exited: the port is taken.
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                if self.cli(&["INFO", "server"]).contains(&ours) {
                    self.child = Some(child);
                    return true;
                }
                if started.elapsed() > Duration::from_secs(2) {
                    // Another process answers there.
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it at once (SIGKILL): its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs a command with `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if self.tls {
            command.arg("--tls").arg("--cacert").arg(self.ca_file());
        }
        let output = command
            .args(args)
            .output()
            .expect("redis-cli must be installed");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Stops the process (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.thaw();
        }
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis Cluster of three masters of the test's own, on free ports.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers and joins them, every slot covered.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(&["--cluster-enabled", "yes"]))
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
        let started = Instant::now();
        while !nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    /// `redis://` URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Its `n`th node, to kill or restart (it keeps its cluster state, `nodes.conf`, in its
    /// directory, so it comes back as the same master of the same slots, empty).
    pub fn node(&mut self, n: usize) -> &mut RedisServer {
        &mut self.nodes[n]
    }

    /// Keys held by each node, to see that customers are spread over the cluster.
    pub fn key_counts(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.cli(&["DBSIZE"]).parse().unwrap_or(0))
            .collect()
    }
}
