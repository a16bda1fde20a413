//! An address on loopback where connection attempts hang: a listener with a backlog of zero whose
//! accept queue is filled and never drained, so the kernel drops further SYNs.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// Holds the listener and the connections that fill its queue.
pub struct Blackhole {
    /// Connections to this address time out.
    pub addr: SocketAddr,
    _listener: Socket,
    _fillers: Vec<TcpStream>,
}

impl Blackhole {
    /// Binds a port and fills its accept queue.
    pub fn start() -> Blackhole {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(stream) => fillers.push(stream),
                Err(_) => break,
            }
        }
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "the accept queue of {addr} is full"
        );
        Blackhole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}
