//! The token's renewal.

use std::sync::atomic::AtomicUsize;

use super::*;

/// A follower of a control plane at an address nothing listens on, for a gateway of a
/// minimal config, with `renewal`.
fn follower(dir: &std::path::Path, renewal: Option<Renewal>) -> Follower {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let (text, config) = crate::config::Config::from_file(&path).unwrap();
    let gateway = Gateway::new(path, text, config).unwrap();
    let source = Source {
        base_url: "http://127.0.0.1:9".into(),
        token: Token::new("tga_first".into()),
        renewal,
    };
    Follower::new(gateway, source, Stored::new(dir.join("snapshot.json.gz"))).unwrap()
}

#[tokio::test]
async fn a_refused_token_is_renewed_at_most_once_a_pause_and_only_with_a_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let made = Arc::new(AtomicUsize::new(0));
    let renewal = {
        let made = Arc::clone(&made);
        Renewal::new(move || {
            let n = made.fetch_add(1, Ordering::Relaxed) + 1;
            Box::pin(async move { Ok(Token::new(format!("tga_renewed_{n}"))) })
        })
    };
    let embedded = follower(dir.path(), Some(renewal));
    assert_eq!(embedded.token(), "tga_first");
    let mut last = None;
    assert!(embedded.renew_token(401, &mut last).await);
    assert_eq!(embedded.token(), "tga_renewed_1");
    // Refused again at once: not the token's fault, and no new one.
    assert!(!embedded.renew_token(403, &mut last).await);
    assert_eq!(made.load(Ordering::Relaxed), 1);
    assert_eq!(embedded.token(), "tga_renewed_1");
    // After the pause, another.
    last = last.and_then(|at| at.checked_sub(RENEWAL_PAUSE));
    assert!(embedded.renew_token(401, &mut last).await);
    assert_eq!(embedded.token(), "tga_renewed_2");

    // A renewal that fails keeps the token in use.
    let failing = Renewal::new(|| Box::pin(async { Err(anyhow::anyhow!("store down")) }));
    let dir = tempfile::tempdir().unwrap();
    let follower_of_failing = follower(dir.path(), Some(failing));
    assert!(!follower_of_failing.renew_token(401, &mut None).await);
    assert_eq!(follower_of_failing.token(), "tga_first");

    // A separate control plane: no renewal, the token stays.
    let dir = tempfile::tempdir().unwrap();
    let remote = follower(dir.path(), None);
    assert!(!remote.renew_token(401, &mut None).await);
    assert_eq!(remote.token(), "tga_first");
    assert!(
        !format!("{remote:?}").contains("tga_first"),
        "no token in Debug"
    );
}
