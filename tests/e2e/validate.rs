//! `gateway --validate`: exit status and every problem with its field path.

use std::process::Command;

use tollgate_tests::gateway::binary;

fn validate(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(binary())
        .arg("--config")
        .arg(&path)
        .arg("--validate")
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
    let (code, _, stderr) = validate(
        r#"
[server]
listen = "127.0.0.1:99999"
admin_listen = "localhost"
colour = "blue"

[[upstreams]]
name = "orders"
targets = ["127.0.0.1:8000", "not an address"]
[[upstreams]]
name = "orders"
targets = ["127.0.0.1:8001"]

[[routes]]
name = "a"
path_prefix = "/a"
upstream = "payments"
[[routes]]
name = "a"
path_prefix = "b"
respond = { status = 99 }
"#,
    );
    assert_eq!(code, 1);
    let expected = ["server.colour: unknown field `colour`"];
    for line in expected {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    // An unknown key stops the typed parse of [server]; the other sections are still checked.
    let (code, _, stderr) = validate(
        r#"
[server]
listen = "127.0.0.1:99999"
admin_listen = "localhost"

[[upstreams]]
name = "orders"
targets = ["127.0.0.1:8000", "not an address"]
[[upstreams]]
name = "orders"
targets = ["127.0.0.1:8001"]

[[routes]]
name = "a"
path_prefix = "/a"
upstream = "payments"
[[routes]]
name = "a"
path_prefix = "b"
respond = { status = 99 }
"#,
    );
    assert_eq!(code, 1);
    for line in [
        "server.listen: invalid address \"127.0.0.1:99999\"",
        "server.admin_listen: invalid address \"localhost\"",
        "upstreams[0].targets[1]: invalid target \"not an address\"",
        "upstreams[1].name: duplicate name \"orders\" (also upstreams[0])",
        "routes[0].upstream: no upstream named \"payments\" is defined",
        "routes[1].path_prefix: must start with /",
        "routes[1].respond.status: invalid status 99",
        "routes[1].name: duplicate name \"a\" (also routes[0])",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    assert!(stderr.contains("8 problem(s)"), "{stderr}");
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
