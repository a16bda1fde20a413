//! `gateway --validate`: exit status and every problem with its field path.

use std::process::Command;

use tollgate_tests::gateway::binary;

fn validate(text: &str) -> (i32, String, String) {
    validate_with_env(text, &[])
}

/// `--validate` of `text` with `env` set.
fn validate_with_env(text: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(binary())
        .arg("--config")
        .arg(&path)
        .arg("--validate")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn the_shipped_config_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.toml");
    let output = Command::new(binary())
        .args(["--config", shipped, "--validate"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains(": ok ("));
}

#[test]
fn every_problem_is_printed_with_its_field_path() {
    let (code, stdout, stderr) = validate(
        r#"
colour = "blue"

[server]
listen = "127.0.0.1:99999"
admin_listen = "localhost"
threads = "two"

[[upstreams]]
name = "orders"
targets = ["127.0.0.1:8000", "not an address"]
[[upstreams]]
name = "orders"
targets = ["127.0.0.1:8001"]
[[upstreams]]
name = "users"
targets = ["127.0.0.1:8002"]
retries = 3

[[routes]]
name = "a"
path_prefix = "/a"
upstream = "payments"
[[routes]]
name = "a"
path_prefix = "b"
respond = { status = 99 }
[[routes]]
name = "users"
path_prefix = "/users"
upstream = "users"
"#,
    );
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    let expected = [
        "colour: unknown key (expected one of server, log, security_headers, cors, control_plane, auth, metering, redis, jwt_providers, upstreams, routes)",
        "server.threads: invalid type: string \"two\", expected usize",
        "upstreams[2].retries: unknown key",
        "upstreams[0].targets[1]: invalid target \"not an address\": expected \"host:port\"",
        "upstreams[1].name: duplicate name \"orders\" (also upstreams[0])",
        "routes[0].upstream: no upstream named \"payments\" is defined",
        "routes[1].path_prefix: must start with /",
        "routes[1].respond.status: invalid status 99: must be 200 to 599",
        "routes[1].name: duplicate name \"a\" (also routes[0])",
    ];
    for line in expected {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    assert!(
        stderr.contains(&format!("{} problem(s)", expected.len())),
        "{stderr}"
    );
    // [server] did not parse (threads), so its addresses are not checked further; a file with
    // only address problems reports them.
    let (code, _, stderr) =
        validate("[server]\nlisten = \"127.0.0.1:99999\"\nadmin_listen = \"localhost\"\n");
    assert_eq!(code, 1);
    for line in [
        "server.listen: invalid address \"127.0.0.1:99999\"",
        "server.admin_listen: invalid address \"localhost\"",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
}

#[test]
fn syntax_errors_name_the_line() {
    let (code, _, stderr) = validate("[server]\nadmin_listen = \"127.0.0.1:9090\"\nlisten = [\n");
    assert_eq!(code, 1);
    assert!(stderr.contains("not valid TOML (line"), "{stderr}");
}

#[test]
fn a_good_file_passes() {
    let (code, stdout, stderr) = validate(
        r#"
[server]
listen = ["127.0.0.1:8080", "[::1]:8080"]
admin_listen = "127.0.0.1:9090"
[[upstreams]]
name = "orders"
targets = ["localhost:8000"]
[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "orders"
"#,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok (1 routes, 1 upstreams)"));
}

/// The commented example at the end of the shipped file, uncommented, is a valid config: the
/// documentation cannot drift from what the gateway accepts.
#[test]
fn the_commented_example_in_the_shipped_config_is_valid() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.toml")).unwrap();
    let start = shipped
        .find("# [[upstreams]]")
        .expect("the example upstream");
    let example: Vec<&str> = shipped[start..]
        .lines()
        .map(|line| {
            line.strip_prefix("# ")
                .unwrap_or(if line == "#" { "" } else { line })
        })
        .collect();
    let text = format!("{}{}", &shipped[..start], example.join("\n"));
    let (code, stdout, stderr) = validate(&text);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok (4 routes, 1 upstreams)"), "{stdout}");
}

#[test]
fn a_port_in_use_stops_the_start_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let output = Command::new(binary())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn a_weak_hmac_secret_in_the_environment_fails_validation_with_the_field_named() {
    let text = r#"
[server]
listen = ["127.0.0.1:8080"]
admin_listen = "127.0.0.1:9090"
[control_plane]
embedded = true
[[jwt_providers]]
name = "idp"
issuer = "https://idp.test/"
audiences = ["api"]
algorithms = ["HS256"]
secret_env = "TOLLGATE_TEST_HS_SECRET"
"#;
    let (code, _, stderr) = validate_with_env(text, &[("TOLLGATE_TEST_HS_SECRET", "short")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "jwt_providers[0].secret_env: TOLLGATE_TEST_HS_SECRET holds 5 bytes; an HMAC secret needs at least 32"
        ),
        "{stderr}"
    );
    let strong = "s".repeat(32);
    let (code, _, stderr) = validate_with_env(text, &[("TOLLGATE_TEST_HS_SECRET", &strong)]);
    assert_eq!(code, 0, "{stderr}");
}
