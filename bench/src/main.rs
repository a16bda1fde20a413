//! `loadgen`: sends HTTP/1.1 requests at a constant rate and reports latency percentiles.
//!
//! `wrk` measures throughput at saturation, but its latencies are taken under saturation too.
//! This tool answers the other question: at a fixed, moderate rate, how long does each request
//! take? Requests are scheduled at fixed times over keep-alive connections (each connection sends
//! every `connections / rate` seconds). When a response comes back after the next request was due,
//! that next request's latency is measured from when it was due, not from when it could be
//! written, so a stall is counted in full for every request it delays (no coordinated omission).
//! Otherwise it is measured from when it was written, so the timer's own wake-up lag (about a
//! millisecond in tokio) is not counted against the server.
//!
//! ```text
//! loadgen --addr 127.0.0.1:8080 --path /hello --rate 2000 --seconds 10 --connections 16 \
//!         [--header "X-API-Key: tg_..."]
//! ```
//!
//! It only connects to loopback addresses and stops after at most 300 seconds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MAX_SECONDS: u64 = 300;

#[derive(Debug)]
struct Args {
    addr: SocketAddr,
    path: String,
    rate: u32,
    seconds: u64,
    connections: u32,
    headers: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        path: "/".to_owned(),
        rate: 1000,
        seconds: 10,
        connections: 16,
        headers: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => args.addr = value.parse().map_err(|e| format!("--addr: {e}"))?,
            "--path" => args.path = value,
            "--rate" => args.rate = value.parse().map_err(|e| format!("--rate: {e}"))?,
            "--seconds" => args.seconds = value.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--connections" => {
                args.connections = value.parse().map_err(|e| format!("--connections: {e}"))?;
            }
            "--header" => args.headers.push(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if !args.addr.ip().is_loopback() {
        return Err("--addr must be a loopback address".to_owned());
    }
    if args.rate == 0 || args.connections == 0 || args.seconds == 0 || args.seconds > MAX_SECONDS {
        return Err(format!(
            "--rate, --connections must be > 0 and --seconds 1..={MAX_SECONDS}"
        ));
    }
    Ok(args)
}

#[derive(Debug, Default)]
struct Outcome {
    latencies_us: Vec<u64>,
    errors: u64,
    non_2xx: u64,
}

async fn connection(args: &Args, index: u32, start: Instant, end: Instant) -> Outcome {
    let mut outcome = Outcome::default();
    let mut request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", args.path, args.addr);
    for header in &args.headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let interval = Duration::from_secs_f64(f64::from(args.connections) / f64::from(args.rate));
    let mut scheduled = start + Duration::from_secs_f64(f64::from(index) / f64::from(args.rate));
    let mut stream: Option<BufReader<TcpStream>> = None;
    let mut free_at = start;
    while scheduled < end {
        tokio::time::sleep_until(scheduled.into()).await;
        // Late because the previous response was late: count from when this one was due.
        let measured_from = if free_at > scheduled {
            scheduled
        } else {
            Instant::now()
        };
        if stream.is_none() {
            stream = TcpStream::connect(args.addr).await.ok().map(|s| {
                let _ = s.set_nodelay(true);
                BufReader::new(s)
            });
        }
        let result = match stream.as_mut() {
            Some(s) => exchange(s, request.as_bytes()).await,
            None => Err(std::io::Error::other("connect failed")),
        };
        match result {
            Ok(status) => {
                free_at = Instant::now();
                outcome
                    .latencies_us
                    .push((free_at - measured_from).as_micros() as u64);
                if !(200..300).contains(&status) {
                    outcome.non_2xx += 1;
                }
            }
            Err(_) => {
                free_at = Instant::now();
                outcome.errors += 1;
                stream = None;
            }
        }
        scheduled += interval;
    }
    outcome
}

/// Writes one request and reads one response (Content-Length or chunked); returns the status.
async fn exchange(stream: &mut BufReader<TcpStream>, request: &[u8]) -> std::io::Result<u16> {
    stream.get_mut().write_all(request).await?;
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::other("closed"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let mut length = 0usize;
    let mut chunked = false;
    loop {
        line.clear();
        stream.read_line(&mut line).await?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked") {
                chunked = true;
            }
        }
    }
    if chunked {
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
            let mut chunk = vec![0; size + 2];
            stream.read_exact(&mut chunk).await?;
            if size == 0 {
                break;
            }
        }
    } else {
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;
    }
    Ok(status)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("loadgen: {error}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadgen: {error}");
            std::process::exit(1);
        }
    };
    let outcome = runtime.block_on(async {
        let start = Instant::now() + Duration::from_millis(50);
        let end = start + Duration::from_secs(args.seconds);
        let args = std::sync::Arc::new(args);
        let tasks: Vec<_> = (0..args.connections)
            .map(|i| {
                let args = args.clone();
                tokio::spawn(async move { connection(&args, i, start, end).await })
            })
            .collect();
        let mut total = Outcome::default();
        for task in tasks {
            if let Ok(outcome) = task.await {
                total.latencies_us.extend(outcome.latencies_us);
                total.errors += outcome.errors;
                total.non_2xx += outcome.non_2xx;
            }
        }
        (total, args.seconds)
    });
    let (mut outcome, seconds) = outcome;
    outcome.latencies_us.sort_unstable();
    let done = outcome.latencies_us.len();
    println!(
        "requests={done} rate={:.0}/s errors={} non_2xx={} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        done as f64 / seconds as f64,
        outcome.errors,
        outcome.non_2xx,
        percentile(&outcome.latencies_us, 50.0),
        percentile(&outcome.latencies_us, 90.0),
        percentile(&outcome.latencies_us, 99.0),
        percentile(&outcome.latencies_us, 100.0),
    );
}
