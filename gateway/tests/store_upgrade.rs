//! A store written by an older `main` (the fixture in `tests/fixtures/store-v11`) opens and
//! migrates in place: nothing lost, its device secrets sealed with the key file, and a key
//! file that is not the store's refused by name.

use std::{collections::HashMap, path::Path};

use gridsense_gateway::{
    config::Synchronous,
    store::{Store, StoreError, prelude::*},
};
use gridsense_protocol::Eui;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-v11");

fn count(db: &Path, table: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).expect("count")
}

const TABLES: [&str; 14] = [
    "devices",
    "counters",
    "health",
    "messages",
    "telemetry",
    "rule_state",
    "incidents",
    "incident_evidence",
    "cases",
    "case_events",
    "outbox",
    "alerts",
    "patrols",
    "api_tokens",
];

#[test]
fn a_version_11_store_opens_migrates_and_seals_its_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("gridsense.db");
    std::fs::copy(Path::new(FIXTURE).join("gridsense.db"), &db).expect("copy fixture");
    let before: Vec<i64> = TABLES.iter().map(|t| count(&db, t)).collect();
    let inventory =
        gridsense_common::inventory::load(&Path::new(FIXTURE).join("devices.json")).expect("inv");
    let key_file = dir.path().join("secrets/store.key");

    let store = Store::open_keyed(&db, Synchronous::Normal, 10_000, &key_file).expect("opens");
    assert_eq!(store.schema_version().expect("version"), 13);
    let after: Vec<i64> = TABLES.iter().map(|t| count(&db, t)).collect();
    assert_eq!(after, before, "every row kept ({TABLES:?})");
    // Version 13 gives the older cases their filing, first dispatch and returns from their
    // trace: every case agrees with its own events.
    let disagree: i64 = rusqlite::Connection::open(&db)
        .expect("open")
        .query_row(
            "SELECT count(*) FROM cases c WHERE
                c.filed_ms IS NOT (SELECT MIN(at_ms) FROM case_events e WHERE e.case_id = c.id AND e.to_state = 'filed')
                OR c.first_dispatched_ms IS NOT (SELECT MIN(at_ms) FROM case_events e WHERE e.case_id = c.id AND e.to_state = 'dispatched')
                OR c.returns != (SELECT count(*) FROM case_events e WHERE e.case_id = c.id AND e.to_state = 'returned')",
            [],
            |r| r.get(0),
        )
        .expect("backfill");
    assert_eq!(disagree, 0, "cases whose backfilled figures disagree with their trace");
    assert!(before.iter().all(|&n| n > 0), "the fixture has every kind of row: {before:?}");

    // The gateway reads the same keys and the broker the same passwords.
    let keys: HashMap<Eui, [u8; 16]> = store
        .registry()
        .expect("registry")
        .into_iter()
        .map(|r| (r.eui, *r.key.expose_bytes()))
        .collect();
    let passwords: HashMap<String, String> =
        store.credentials().expect("credentials").into_iter().collect();
    for d in &inventory {
        assert_eq!(keys.get(&d.eui), Some(d.key.expose_bytes()), "key of {}", d.eui);
        assert_eq!(passwords.get(&d.record.eui), Some(&d.record.mqtt_password));
    }
    assert_eq!(store.tokens().expect("tokens").len(), 1);
    drop(store);

    // Nothing of a key or a password is left in the database's files.
    let conn = rusqlite::Connection::open(&db).expect("open");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).expect("checkpoint");
    conn.execute_batch("VACUUM").expect("vacuum");
    drop(conn);
    let mut bytes = std::fs::read(&db).expect("read db");
    for suffix in ["-wal", "-shm"] {
        bytes.extend(std::fs::read(format!("{}{suffix}", db.display())).unwrap_or_default());
    }
    for d in &inventory {
        let key = d.key.expose_bytes();
        assert!(!bytes.windows(16).any(|w| w == key), "key of {} in the clear", d.eui);
        let pw = d.record.mqtt_password.as_bytes();
        assert!(!bytes.windows(pw.len()).any(|w| w == pw), "password of {} in the clear", d.eui);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).expect("key file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key file is private");
    }

    // Opened again with its key: the same; with another key file: refused by name.
    Store::open_keyed(&db, Synchronous::Normal, 10_000, &key_file).expect("reopens");
    let other = dir.path().join("other.key");
    match Store::open_keyed(&db, Synchronous::Normal, 10_000, &other) {
        Err(e @ StoreError::WrongKey { .. }) => {
            let text = e.to_string();
            assert!(text.contains("other.key") && text.contains("not the key"), "{text}");
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
}
