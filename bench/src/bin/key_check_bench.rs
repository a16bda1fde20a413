//! `key_check_bench`: how long [`check_key`] takes for a real key; for guesses one character off
//! a real key (the last random character, or the first), well-formed (their checksums are their
//! own); for well-formed guesses that share nothing with any real key (two sets: how far apart
//! they come out is the measurement's own spread); and for guesses whose checksum is wrong, with
//! N keys loaded (1,000,000 unless told).
//!
//! ```text
//! cargo build --release -p tollgate-bench --bin key_check_bench
//! key_check_bench [--keys N] [--rounds R]
//! ```
//!
//! Each round times every kind once, in an order drawn anew for the round (so that no kind
//! always runs after the same other one, which leaves the caches its own way): the `GUESSES`
//! different keys of that kind, each checked once (so that no one key stays in the caches). The
//! rounds are short (about a millisecond each), so a slow spell of a shared machine falls on all
//! kinds alike; the figures are nanoseconds per check: the median round, and the quartiles. A
//! guess one character off costing what a far miss costs, within the two far sets' own spread, is
//! what shows that the check does not end early on a partial match.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tollgate_gateway::identity::index::{Builder, CustomerEntry, Id, Identities, KeyEntry};
use tollgate_gateway::identity::{Refusal, check_key};
use tollgate_model::customer::CustomerStatus;
use tollgate_model::key;
use tollgate_model::plan::{Plan, PlanStatus};

/// Different keys of each kind.
const GUESSES: usize = 4_096;
/// A key's random part is a number written in base 62, one character a digit.
const BASE: u128 = 62;
/// Characters of a key's random part.
const RANDOM_LEN: usize = 22;

fn main() -> anyhow::Result<()> {
    let mut keys = 1_000_000usize;
    let mut rounds = 1_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--keys" => keys = value.parse()?,
            "--rounds" => rounds = value.parse()?,
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    anyhow::ensure!(keys >= GUESSES, "--keys must be at least {GUESSES}");

    let mut random = SplitMix(0x7011_6a7e);
    let customer: Id = [1; 16];
    let mut real = Vec::with_capacity(keys);
    let mut entries = Vec::with_capacity(keys);
    for n in 0..keys {
        let value = random.next_u128();
        let text = key::from_random(value.to_be_bytes());
        let mut id: Id = [0; 16];
        id[..8].copy_from_slice(&(n as u64).to_be_bytes());
        entries.push(KeyEntry {
            hash: Sha256::digest(text.as_bytes()).into(),
            id,
            customer,
            expires_at_ms: i64::MAX,
            revoked_at_ms: i64::MAX,
            scopes: None,
        });
        real.push((value, text));
    }
    let identities = index(entries, customer)?;

    let step = keys / GUESSES;
    let chosen: Vec<&(u128, String)> = (0..GUESSES).map(|i| &real[i * step]).collect();
    let found: Vec<String> = chosen.iter().map(|(_, text)| text.clone()).collect();
    let last_off = one_character_off(&chosen, RANDOM_LEN - 1)?;
    let first_off = one_character_off(&chosen, 0)?;
    let mut far = || -> Vec<String> {
        (0..GUESSES)
            .map(|_| key::from_random(random.next_u128().to_be_bytes()))
            .collect()
    };
    let (far_a, far_b) = (far(), far());
    let bad_checksum: Vec<String> = last_off.iter().map(|guess| break_checksum(guess)).collect();

    let kinds: [(&str, &[String], Expect); 6] = [
        ("real key", &found, Expect::Found),
        (
            "last random character off (the first 24 shared)",
            &last_off,
            Expect::Unknown,
        ),
        (
            "first random character off (the other 21 shared)",
            &first_off,
            Expect::Unknown,
        ),
        ("far miss, set A (nothing shared)", &far_a, Expect::Unknown),
        (
            "far miss, set B (the same kind again)",
            &far_b,
            Expect::Unknown,
        ),
        (
            "wrong checksum (no lookup)",
            &bad_checksum,
            Expect::Malformed,
        ),
    ];
    for (name, guesses, expect) in &kinds {
        for guess in guesses.iter() {
            let outcome = check_key(&identities, guess, Some("bench"), 0);
            anyhow::ensure!(expect.matches(&outcome), "{name}: {guess} gave {outcome:?}");
        }
    }
    println!("{keys} keys loaded; {rounds} rounds of {GUESSES} checks of each kind");
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for _ in 0..rounds {
        let mut order: Vec<usize> = (0..kinds.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (random.next_u64() % (i as u64 + 1)) as usize);
        }
        for which in order {
            let started = Instant::now();
            for guess in kinds[which].1 {
                black_box(check_key(&identities, black_box(guess), Some("bench"), 0).is_ok());
            }
            times[which].push(started.elapsed().as_secs_f64() * 1e9 / GUESSES as f64);
        }
    }
    println!("ns per check: median round (first quartile to third)");
    for ((name, _, _), mut runs) in kinds.iter().zip(times) {
        runs.sort_by(f64::total_cmp);
        let at = |fraction: f64| runs[((runs.len() - 1) as f64 * fraction) as usize];
        println!(
            "  {name}: {:.1} ({:.1} to {:.1})",
            at(0.5),
            at(0.25),
            at(0.75)
        );
    }
    Ok(())
}

/// What a kind of guess must get.
enum Expect {
    Found,
    Unknown,
    Malformed,
}

impl Expect {
    fn matches<T>(&self, outcome: &Result<T, Refusal>) -> bool {
        matches!(
            (self, outcome),
            (Self::Found, Ok(_))
                | (Self::Unknown, Err(Refusal::Unknown))
                | (Self::Malformed, Err(Refusal::Malformed))
        )
    }
}

/// For each real key, a well-formed key whose random part differs from it in the character at
/// `position` alone (0 is the first after `tg_`), checked.
fn one_character_off(real: &[&(u128, String)], position: usize) -> anyhow::Result<Vec<String>> {
    let exponent = u32::try_from(RANDOM_LEN - 1 - position)?;
    let weight = BASE.pow(exponent);
    let mut guesses = Vec::with_capacity(real.len());
    for (value, text) in real {
        // One down where the digit is not 0, else one up: no carry reaches another digit.
        let digit = value / weight % BASE;
        let off = if digit > 0 {
            value - weight
        } else {
            value + weight
        };
        let guess = key::from_random(off.to_be_bytes());
        let start = key::KEY_PREFIX.len();
        let differing: Vec<usize> = (start..start + RANDOM_LEN)
            .filter(|&i| guess.as_bytes()[i] != text.as_bytes()[i])
            .collect();
        anyhow::ensure!(
            differing == [start + position],
            "{guess} differs from {text} at {differing:?}"
        );
        guesses.push(guess);
    }
    Ok(guesses)
}

/// `guess` with its last checksum character changed.
fn break_checksum(guess: &str) -> String {
    let mut bytes = guess.as_bytes().to_vec();
    if let Some(last) = bytes.last_mut() {
        *last = if *last == b'0' { b'1' } else { b'0' };
    }
    String::from_utf8(bytes).unwrap_or_default()
}

/// One plan, one active customer, and `entries`.
fn index(entries: Vec<KeyEntry>, customer: Id) -> anyhow::Result<Identities> {
    let plan = Plan {
        id: "plan_bench".into(),
        name: "bench".into(),
        rate_limits: Vec::new(),
        quota: None,
        price: None,
        upgrade_url: None,
        status: PlanStatus::Active,
        created_at: "2026-01-01T00:00:00Z".into(),
        updated_at: "2026-01-01T00:00:00Z".into(),
    };
    let plan_id: Arc<str> = "plan_bench".into();
    let builder = Builder {
        version: 1,
        version_at_ms: None,
        plans: [(Arc::clone(&plan_id), Arc::new(plan))]
            .into_iter()
            .collect(),
        customers: [(
            customer,
            CustomerEntry {
                plan_id,
                status: CustomerStatus::Active,
                id_header: http::HeaderValue::from_static("cus_bench"),
                plan_header: http::HeaderValue::from_static("plan_bench"),
                billing_period: None,
            },
        )]
        .into_iter()
        .collect(),
        keys: entries,
    };
    builder
        .build()
        .map_err(|invalid| anyhow::anyhow!("{invalid}"))
}

/// A small, seeded generator: the same keys every run.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }
}
