//! Request body and header limits.

use serde_json::Value;
use tollgate_tests::{Gateway, Upstream, client, config};

fn limits_config(upstream: &Upstream) -> String {
    config(&format!(
        r#"
[[upstreams]]
name = "echo"
targets = ["{}"]
[[routes]]
name = "small"
path_prefix = "/small"
upstream = "echo"
max_request_body_bytes = 16
[[routes]]
name = "echo"
path_prefix = "/"
upstream = "echo"
"#,
        upstream.target()
    ))
    .replace(
        "grace_period = \"10s\"",
        "grace_period = \"10s\"\nmax_request_body_bytes = 1000\nmax_request_headers = 20",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413_problems() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&limits_config(&upstream)).await;
    let client = client();

    let response = client
        .post(gateway.url("/upload"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["body_len"], 1000);

    let response = client
        .post(gateway.url("/upload"))
        .body(vec![b'x'; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:request-too-large");
    assert_eq!(
        problem["detail"],
        "the request body exceeds the limit of 1000 bytes"
    );
    assert_eq!(
        upstream.requests(),
        1,
        "a declared oversized body never reaches the upstream"
    );

    let response = client
        .post(gateway.url("/small"))
        .body(vec![b'x'; 17])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413, "the route's own limit applies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_counted_as_they_stream() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&limits_config(&upstream)).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![b'x'; 100])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let response = client()
        .post(gateway.url("/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:request-too-large");
    assert_eq!(
        problem["detail"],
        "the request body exceeds the limit of 1000 bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_large_headers_are_431_problems() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&limits_config(&upstream)).await;
    let client = client();
    let mut request = client.get(gateway.url("/x"));
    for i in 0..25 {
        request = request.header(format!("x-extra-{i}"), "1");
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 431);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:headers-too-large");

    let response = client
        .get(gateway.url("/x"))
        .header("x-big", "y".repeat(40_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_a_request_with_a_body_closes_the_connection() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(
        &limits_config(&upstream).replace("path_prefix = \"/\"", "path_prefix = \"/echo\""),
    )
    .await;
    let mut connection = tollgate_tests::raw::RawConnection::connect(gateway.proxy)
        .await
        .unwrap();
    // Half of the declared body is sent: the gateway must not wait to drain the rest.
    let response = connection
        .send("POST /unrouted HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    assert_eq!(response.status, 404);
    assert_eq!(response.headers["connection"], "close");

    let mut connection = tollgate_tests::raw::RawConnection::connect(gateway.proxy)
        .await
        .unwrap();
    let response = connection.get("/unrouted").await.unwrap();
    assert_eq!(response.status, 404);
    assert_eq!(
        response.headers["connection"], "keep-alive",
        "no body: the connection stays"
    );
    assert_eq!(connection.get("/unrouted").await.unwrap().status, 404);
}
