use sha2::{Digest, Sha256};
use tollgate_model::feed::{ChangedEntity, CustomerRecord, KeyRecord};
use tollgate_model::plan::{Plan, PlanStatus};

use super::*;
use crate::identity::{Refusal, check_key, snapshot};

fn plan(id: &str) -> Plan {
    Plan {
        id: id.into(),
        name: id.into(),
        rate_limits: Vec::new(),
        quota: None,
        price: None,
        upgrade_url: None,
        status: PlanStatus::Active,
        created_at: "2026-01-01T00:00:00Z".into(),
        updated_at: "2026-01-01T00:00:00Z".into(),
    }
}

fn hex_id(prefix: &str, n: u8) -> String {
    format_id(prefix, &[n; 16])
}

fn key_text(n: u32) -> String {
    let mut random = [0u8; 16];
    random[..4].copy_from_slice(&n.to_be_bytes());
    tollgate_model::key::from_random(random)
}

fn key_record(n: u32, customer: u8) -> KeyRecord {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    KeyRecord {
        id: format_id("key", &id),
        customer_id: hex_id("cus", customer),
        hash: hex::encode(Sha256::digest(key_text(n).as_bytes())),
        expires_at_ms: None,
        revoked_at_ms: None,
        scopes: None,
    }
}

fn snapshot_json(keys: &[KeyRecord]) -> String {
    serde_json::json!({
        "version": 7,
        "plans": [plan("plan_a"), plan("plan_b")],
        "customers": [
            {"id": hex_id("cus", 1), "plan_id": "plan_a", "status": "active"},
            {"id": hex_id("cus", 2), "plan_id": "plan_b", "status": "suspended"},
        ],
        "keys": keys,
        "added_later": {"ignored": true},
    })
    .to_string()
}

fn load(keys: &[KeyRecord]) -> Identities {
    snapshot::read(
        snapshot_json(keys).as_bytes(),
        &mut ScopeInterner::default(),
    )
    .unwrap()
}

#[test]
fn ids_round_trip_and_bad_ones_are_refused() {
    let id = parse_id("key", "key_0123456789abcdef0123456789ABCDEF").unwrap();
    assert_eq!(
        format_id("key", &id),
        "key_0123456789abcdef0123456789abcdef"
    );
    assert_eq!(
        parse_id("key", "cus_0123456789abcdef0123456789abcdef"),
        None
    );
    assert_eq!(parse_id("key", "key_0123"), None);
    assert_eq!(
        parse_id("key", "key_0123456789abcdef0123456789abcdeg"),
        None
    );
}

#[test]
fn a_snapshot_is_read_and_every_key_found_by_its_hash() {
    let keys: Vec<KeyRecord> = (0..500).map(|n| key_record(n, 1)).collect();
    let identities = load(&keys);
    assert_eq!(identities.version, 7);
    assert_eq!(identities.key_count(), 500);
    for n in [0, 1, 250, 499] {
        let caller = check_key(&identities, &key_text(n), Some("orders"), 1).unwrap();
        assert_eq!(format_id("cus", &caller.customer), hex_id("cus", 1));
        assert_eq!(
            IdText::new(b"cus", &caller.customer).as_str(),
            hex_id("cus", 1)
        );
        assert_eq!(&*caller.plan_id, "plan_a");
        assert_eq!(format_id("key", &caller.key.unwrap()), keys[n as usize].id);
    }
    assert_eq!(
        check_key(&identities, &key_text(500), Some("orders"), 1),
        Err(Refusal::Unknown)
    );
}

#[test]
fn each_refusal_has_its_reason() {
    let mut expired = key_record(1, 1);
    expired.expires_at_ms = Some(1_000);
    let mut revoked = key_record(2, 1);
    revoked.revoked_at_ms = Some(2_000);
    let mut scoped = key_record(3, 1);
    scoped.scopes = Some(vec!["orders".into(), "users".into()]);
    let suspended = key_record(4, 2);
    let identities = load(&[expired, revoked, scoped, suspended]);
    let check = |n: u32, route: &str, now: i64| {
        check_key(&identities, &key_text(n), Some(route), now).map(|_| ())
    };
    assert_eq!(check(1, "orders", 999), Ok(()));
    assert_eq!(check(1, "orders", 1_000), Err(Refusal::Expired));
    assert_eq!(
        check(2, "orders", 1_999),
        Ok(()),
        "works until its grace ends"
    );
    assert_eq!(check(2, "orders", 2_000), Err(Refusal::Revoked));
    assert_eq!(check(3, "users", 1), Ok(()));
    assert_eq!(check(3, "billing", 1), Err(Refusal::OutOfScope));
    // The customer's own usage view names no scope: any of its keys reads it, but the other
    // refusals hold there too.
    assert!(check_key(&identities, &key_text(3), None, 1).is_ok());
    assert_eq!(
        check_key(&identities, &key_text(2), None, 2_000).map(|_| ()),
        Err(Refusal::Revoked)
    );
    assert_eq!(check(4, "orders", 1), Err(Refusal::Suspended));
    assert_eq!(
        check_key(&identities, "tg_notakey", Some("orders"), 1),
        Err(Refusal::Malformed)
    );
    let mut typo = key_text(1);
    typo.replace_range(5..6, if &typo[5..6] == "A" { "B" } else { "A" });
    assert_eq!(
        check_key(&identities, &typo, Some("orders"), 1),
        Err(Refusal::Malformed),
        "a changed character breaks the checksum: no lookup"
    );
}

#[test]
fn snapshots_that_do_not_check_are_refused() {
    let read = |text: &str| snapshot::read(text.as_bytes(), &mut ScopeInterner::default());
    let mut orphan = key_record(1, 9);
    orphan.customer_id = hex_id("cus", 9);
    let error = read(&snapshot_json(&[orphan])).unwrap_err();
    assert!(
        error.0.contains("which the snapshot does not have"),
        "{error}"
    );
    let error = read(&snapshot_json(&[key_record(1, 1), key_record(1, 1)])).unwrap_err();
    assert!(error.0.contains("the same hash"), "{error}");
    let mut same_id = key_record(2, 1);
    same_id.id = key_record(1, 1).id;
    let error = read(&snapshot_json(&[key_record(1, 1), same_id])).unwrap_err();
    assert!(
        error.0.contains("appears twice, with different hashes"),
        "{error}"
    );
    let mut bad_hash = key_record(1, 1);
    bad_hash.hash = "xyz".into();
    let error = read(&snapshot_json(&[bad_hash])).unwrap_err();
    assert!(error.0.contains("64 hex digits"), "{error}");
    let error = read(r#"{"version": 1, "plans": [], "customers": []}"#).unwrap_err();
    assert!(error.0.contains("missing field `keys`"), "{error}");
    let truncated = snapshot_json(&[key_record(1, 1)]);
    let error = read(&truncated[..truncated.len() - 20]).unwrap_err();
    assert!(error.0.contains("not a valid snapshot"), "{error}");
    let wrong_plan = serde_json::json!({
        "version": 1, "plans": [],
        "customers": [{"id": hex_id("cus", 1), "plan_id": "plan_x", "status": "active"}],
        "keys": []
    });
    let error = read(&wrong_plan.to_string()).unwrap_err();
    assert!(error.0.contains("plan plan_x"), "{error}");
}

#[test]
fn changes_apply_on_top_and_compaction_keeps_every_key() {
    let identities = load(&(0..10).map(|n| key_record(n, 1)).collect::<Vec<_>>());
    let mut revoked = key_record(3, 1);
    revoked.revoked_at_ms = Some(0);
    let changes = [
        ChangedEntity::Key {
            id: revoked.id.clone(),
            key: Some(revoked),
        },
        ChangedEntity::Key {
            id: key_record(10, 2).id,
            key: Some(key_record(10, 2)),
        },
        ChangedEntity::Customer {
            id: hex_id("cus", 2),
            customer: Some(CustomerRecord {
                id: hex_id("cus", 2),
                plan_id: "plan_a".into(),
                status: tollgate_model::customer::CustomerStatus::Active,
                billing_period: None,
            }),
        },
    ];
    let Applied::Next(next) = identities
        .apply(8, None, changes.iter(), &mut ScopeInterner::default())
        .unwrap()
    else {
        panic!("applies");
    };
    assert_eq!(next.version, 8);
    assert_eq!(next.key_count(), 11);
    assert_eq!(
        check_key(&next, &key_text(3), Some("r"), 1),
        Err(Refusal::Revoked)
    );
    let caller = check_key(&next, &key_text(10), Some("r"), 1).unwrap();
    assert_eq!(&*caller.plan_id, "plan_a", "the customer moved to plan_a");
    // The earlier identities are untouched.
    assert!(check_key(&identities, &key_text(3), Some("r"), 1).is_ok());

    // Past the overlay limit, the overlay is merged into the base; nothing is lost.
    let many: Vec<ChangedEntity> = (100..100 + OVERLAY_LIMIT as u32 + 5)
        .map(|n| ChangedEntity::Key {
            id: key_record(n, 1).id,
            key: Some(key_record(n, 1)),
        })
        .collect();
    let Applied::Next(merged) = next
        .apply(9, None, many.iter(), &mut ScopeInterner::default())
        .unwrap()
    else {
        panic!("applies");
    };
    assert!(merged.keys.overlay.is_empty());
    assert_eq!(merged.key_count(), 11 + OVERLAY_LIMIT + 5);
    for n in [0, 3, 10, 100, 100 + OVERLAY_LIMIT as u32 + 4] {
        assert!(
            merged
                .key(&Sha256::digest(key_text(n).as_bytes()).into())
                .is_some()
        );
    }
}

#[test]
fn changes_that_refer_to_nothing_or_delete_ask_for_a_snapshot() {
    let identities = load(&[key_record(1, 1)]);
    let orphan = [ChangedEntity::Key {
        id: key_record(2, 7).id,
        key: Some(key_record(2, 7)),
    }];
    // A page can carry an entity as it is now, naming one made after the page: a snapshot is
    // taken (and checked whole), nothing is refused.
    assert!(matches!(
        identities.apply(8, None, orphan.iter(), &mut ScopeInterner::default()),
        Ok(Applied::NeedsSnapshot(why)) if why.contains("does not hold")
    ));
    let deleted = [ChangedEntity::Key {
        id: key_record(1, 1).id,
        key: None,
    }];
    assert!(matches!(
        identities.apply(8, None, deleted.iter(), &mut ScopeInterner::default()),
        Ok(Applied::NeedsSnapshot(_))
    ));
}

#[test]
fn a_key_entry_takes_96_bytes() {
    // The figure the README and BENCHMARKS.md give for the index.
    assert_eq!(std::mem::size_of::<KeyEntry>(), 96);
}

#[test]
fn equal_scope_sets_share_one_allocation() {
    let mut interner = ScopeInterner::default();
    let a = interner.intern(Some(vec!["orders".into()])).unwrap();
    let b = interner.intern(Some(vec!["orders".into()])).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(interner.intern(None), None);
}
