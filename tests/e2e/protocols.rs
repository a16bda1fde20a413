//! TLS with HTTP/2, WebSocket upgrades, streaming bodies and response compression.

use std::io::Read;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tollgate_tests::{Gateway, Upstream, client, config, tls};

fn echo_config(upstream: &Upstream) -> String {
    format!(
        r#"
[[upstreams]]
name = "echo"
targets = ["{}"]
[[routes]]
name = "gzip"
path_prefix = "/gzip"
strip_prefix = true
upstream = "echo"
compression_level = 6
[[routes]]
name = "echo"
path_prefix = "/"
upstream = "echo"
"#,
        upstream.target()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http2_over_tls_with_hsts() {
    let upstream = Upstream::start("echo");
    let dir = tempfile::tempdir().unwrap();
    let cert = tls::write_self_signed(dir.path());
    let text = config(&echo_config(&upstream)).replace(
        "[log]",
        "[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n[log]",
    );
    let gateway = Gateway::start_in(dir, &text).await;
    let tls_addr = gateway.tls.expect("a TLS listener");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).unwrap())
        .resolve("localhost", tls_addr)
        .build()
        .unwrap();
    let response = client
        .get(format!("https://localhost:{}/hello", tls_addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["path"], "/hello");
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");
    assert_eq!(
        body["headers"]["host"],
        format!("localhost:{}", tls_addr.port())
    );

    let response = reqwest::get(gateway.url("/hello")).await.unwrap();
    assert!(!response.headers().contains_key("strict-transport-security"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_websocket_upgrades() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&config(&echo_config(&upstream))).await;
    let (mut socket, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws", gateway.proxy))
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("x-request-id"));
    for text in ["one", "two", "three"] {
        socket
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let reply = socket.next().await.unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("echo: {text}"));
    }
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_response_bodies_as_they_come() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&config(&echo_config(&upstream))).await;
    let response = client().get(gateway.url("/stream")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    // The upstream holds back its last chunk until released: the first must arrive without it.
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"first\n");
    upstream.release();
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"last\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compresses_responses_on_routes_that_ask_for_it() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&config(&echo_config(&upstream))).await;
    let client = client();
    let response = client
        .get(gateway.url("/gzip/x"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let compressed = response.bytes().await.unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_string(&mut text)
        .unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["path"], "/x");
    assert!(
        compressed.len() < text.len() / 2,
        "{} compressed vs {} plain",
        compressed.len(),
        text.len()
    );

    let response = client
        .get(gateway.url("/plain"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(
        !response.headers().contains_key("content-encoding"),
        "compression is per route"
    );
    let response = client.get(gateway.url("/gzip/x")).send().await.unwrap();
    assert!(
        !response.headers().contains_key("content-encoding"),
        "only when the client accepts it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_outlives_the_read_timeout() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&config(&echo_config(&upstream).replace(
        "name = \"echo\"\ntargets",
        "name = \"echo\"\nread_timeout = \"200ms\"\ntargets",
    )))
    .await;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gateway.proxy))
        .await
        .unwrap();
    // Silence for longer than read_timeout: websocket_idle_timeout (10 min) applies instead.
    tokio::time::sleep(Duration::from_millis(700)).await;
    socket
        .send(tokio_tungstenite::tungstenite::Message::text("still here"))
        .await
        .unwrap();
    let reply = socket.next().await.unwrap().unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "echo: still here");
    assert_eq!(
        gateway.ready().await["upstreams"][0]["targets"][0]["healthy"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_is_bounded_by_the_websocket_idle_timeout() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&config(&echo_config(&upstream).replace(
        "name = \"echo\"\ntargets",
        "name = \"echo\"\nread_timeout = \"200ms\"\nwebsocket_idle_timeout = \"600ms\"\ntargets",
    )))
    .await;
    let started = std::time::Instant::now();
    // The upstream answers this path after 5 s, and never with 101.
    let result =
        tokio_tungstenite::connect_async(format!("ws://{}/slow/5000", gateway.proxy)).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = result else {
        panic!("expected an HTTP error, got {result:?}");
    };
    assert_eq!(response.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_to_tls_upstreams_checked_against_the_configured_ca() {
    // The upstream: a gateway whose TLS listener answers by itself, with a certificate from a
    // test CA.
    let upstream_dir = tempfile::tempdir().unwrap();
    let ca = tls::write_ca_signed(upstream_dir.path());
    let upstream = Gateway::start_in(
        upstream_dir,
        &config("[[routes]]\nname = \"hello\"\npath_prefix = \"/\"\nrespond = { body = \"over tls\" }\n").replace(
            "[log]",
            "[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\nhttp2 = false\n\n[log]",
        ),
    )
    .await;
    let target = upstream.tls.expect("a TLS listener").to_string();
    let proxy_config = |ca_line: &str| {
        config(&format!(
            r#"
[[upstreams]]
name = "secure"
targets = ["{target}"]
tls = true
sni = "localhost"
[[routes]]
name = "secure"
path_prefix = "/"
upstream = "secure"
"#
        ))
        .replace(
            "grace_period = \"10s\"",
            &format!("grace_period = \"10s\"\n{ca_line}"),
        )
    };

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
    let trusting = Gateway::start_in(dir, &proxy_config("upstream_ca_file = \"ca.pem\"")).await;
    let response = client().get(trusting.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "over tls");

    // Without the CA the certificate is not trusted: the gateway refuses the connection.
    let untrusting = Gateway::start(&proxy_config("")).await;
    let response = client().get(untrusting.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 502);
}
