//! The core is pure by construction: its dependency tree (normal dependencies, as `cargo tree`
//! resolves them for the locked workspace) has no async runtime, no database driver and no
//! HTTP stack. A dependency that brings one in fails this test, not a review.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::unwrap_used)]

/// Crates the core must never link (directly or through a dependency).
const FORBIDDEN: [&str; 12] = [
    "tokio",
    "rusqlite",
    "libsqlite3-sys",
    "postgres",
    "tokio-postgres",
    "sqlx",
    "reqwest",
    "hyper",
    "axum",
    "rumqttc",
    "rumqttd",
    "gridsense-simulator",
];

#[test]
fn the_core_links_no_runtime_database_or_network_stack() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "gridsense-core",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--locked",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).unwrap();
    let crates: std::collections::BTreeSet<&str> =
        tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(crates.contains("gridsense-protocol"), "not the core's tree: {tree}");
    let found: Vec<&&str> = FORBIDDEN.iter().filter(|f| crates.contains(**f)).collect();
    assert!(found.is_empty(), "the core depends on {found:?}");
}
