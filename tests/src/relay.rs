//! A TCP relay on loopback in front of another server, which can hold what clients send (the
//! server sees nothing, the client waits for an answer), then either pass it on or drop it with
//! the connection: a call that times out and runs after all, or one that is lost on the way.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A running relay; its threads end with its connections.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Whether connections made from now on start holding.
    holding: AtomicBool,
    connections: Mutex<Vec<Arc<Connection>>>,
}

struct Connection {
    client: TcpStream,
    server: TcpStream,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    holding: bool,
    /// What the client sent while holding, not passed on yet.
    held: Vec<u8>,
}

impl Relay {
    /// A relay to `target` on a free port.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                // Under the list's lock, as `hold` and `cut` take it: a connection made
                // meanwhile holds, or is cut, with the others.
                let mut connections = accepting.connections.lock().unwrap();
                let connection = Arc::new(Connection {
                    client,
                    server,
                    state: Mutex::new(State {
                        holding: accepting.holding.load(Ordering::SeqCst),
                        held: Vec::new(),
                    }),
                });
                connections.push(connection.clone());
                drop(connections);
                let upward = connection.clone();
                std::thread::spawn(move || upward.client_to_server());
                std::thread::spawn(move || connection.server_to_client());
            }
        });
        Relay { addr, shared }
    }

    /// `redis://` and the relay's address.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Holds from now on what every client sends.
    pub fn hold(&self) {
        let connections = self.shared.connections.lock().unwrap();
        self.shared.holding.store(true, Ordering::SeqCst);
        for connection in connections.iter() {
            connection.state.lock().unwrap().holding = true;
        }
    }

    /// Passes on what was held, and everything sent from now on.
    pub fn release(&self) {
        let connections = self.shared.connections.lock().unwrap();
        self.shared.holding.store(false, Ordering::SeqCst);
        for connection in connections.iter() {
            let mut state = connection.state.lock().unwrap();
            let held = std::mem::take(&mut state.held);
            let _ = (&connection.server).write_all(&held);
            state.holding = false;
        }
    }

    /// Drops what was held, and closes every connection: the server never sees it. Connections
    /// made from now on pass everything on.
    pub fn cut(&self) {
        let mut connections = self.shared.connections.lock().unwrap();
        self.shared.holding.store(false, Ordering::SeqCst);
        for connection in connections.drain(..) {
            // First, so that a pump blocked writing (holding the state) lets go.
            let _ = connection.client.shutdown(Shutdown::Both);
            let _ = connection.server.shutdown(Shutdown::Both);
            let mut state = connection.state.lock().unwrap();
            state.held.clear();
            state.holding = false;
        }
    }
}

impl Connection {
    fn client_to_server(&self) {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = match (&self.client).read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let mut state = self.state.lock().unwrap();
            if state.holding {
                state.held.extend_from_slice(&buffer[..read]);
            } else if (&self.server).write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        // What is held still goes on at `release`.
        if self.state.lock().unwrap().held.is_empty() {
            let _ = self.server.shutdown(Shutdown::Write);
        }
    }

    fn server_to_client(&self) {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = match (&self.server).read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if (&self.client).write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        let _ = self.client.shutdown(Shutdown::Write);
    }
}
