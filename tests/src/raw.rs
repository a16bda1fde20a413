//! A bare HTTP/1.1 connection, for tests about what happens on one particular connection.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One keep-alive client connection.
pub struct RawConnection {
    stream: BufReader<TcpStream>,
}

/// A response read from a [`RawConnection`].
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercase.
    pub headers: HashMap<String, String>,
    /// Body (only `Content-Length` bodies are supported).
    pub body: Vec<u8>,
}

impl RawConnection {
    /// Connects.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<RawConnection> {
        Ok(RawConnection {
            stream: BufReader::new(TcpStream::connect(addr).await?),
        })
    }

    /// Sends `GET path` and reads the response.
    pub async fn get(&mut self, path: &str) -> std::io::Result<RawResponse> {
        self.send(&format!(
            "GET {path} HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
        ))
        .await
    }

    /// Sends `request` as written (head and body) and reads the response.
    pub async fn send(&mut self, request: &str) -> std::io::Result<RawResponse> {
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> std::io::Result<RawResponse> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = HashMap::new();
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }
}
