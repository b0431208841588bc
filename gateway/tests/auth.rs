//! Operators' API authentication on a gateway with the default `http.auth = "tokens"`: no
//! token or an unknown one is 401, a read token reads but cannot move a case (403), an
//! operator token can, a revoked token stops working, the event stream takes the token as a
//! query parameter, the dashboard page and probes stay public, oversized bodies are refused.
//! Tokens are made with the CLI, shown once and stored hashed.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use gridsense_gateway::app;
use gridsense_simulator::city::Counts;
use gridsense_tests::{Mosquitto, fixtures};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_the_api() {
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 95, Counts { covers: 2, drains: 0, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.http.auth = "tokens".into();
    let path = dir.path().join("gridsense.toml");
    std::fs::write(&path, format!("[store]\npath = \"{}\"\n", config.store.path.display()))
        .unwrap();
    common::import(&config, dir.path());
    let cli = |args: &[&str]| common::cli(&path, args);
    let token_of = |out: &str| out.lines().last().unwrap().trim().to_owned();
    let reader = token_of(&cli(&["tokens", "add", "--name", "wall screen", "--role", "read"]));
    let operator =
        token_of(&cli(&["tokens", "add", "--name", "dispatcher zhang", "--role", "operator"]));
    assert!(reader.starts_with("gst_") && operator.starts_with("gst_"));
    let listed = cli(&["tokens", "list"]);
    assert!(
        listed.contains("wall screen") && !listed.contains(&reader),
        "never shown again: {listed}"
    );

    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let base = format!("http://{}", gateway.http.unwrap());
    let keys = fixtures::keys(dir.path()).unwrap();
    let eui = *keys.keys().next().unwrap();
    common::publish(broker.addr(), vec![(eui, common::removed(common::now_device_time()))], &keys)
        .await;
    let store = app::open_store(&config).unwrap();
    for _ in 0..50 {
        if store.case(1).unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let client = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut r = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    // Public: the page and the probes.
    for public in ["/", "/healthz", "/readyz"] {
        assert_eq!(status(get(public, None).await.unwrap()), 200, "{public}");
    }
    // Everything else needs a token.
    for guarded in [
        "/api/v1/devices",
        "/api/v1/cases",
        "/api/v1/status",
        "/metrics",
        "/open311/v2/requests.json",
    ] {
        let r = get(guarded, None).await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{guarded}");
        assert!(r.text().await.unwrap().contains("unauthorized"));
        assert_eq!(status(get(guarded, Some("gst_nonsense")).await.unwrap()), 401, "{guarded}");
        assert_eq!(status(get(guarded, Some(&reader)).await.unwrap()), 200, "{guarded}");
    }
    // Moving a case needs the operator role.
    let post = |token: &str, body: String| {
        client
            .post(format!("{base}/api/v1/cases/1/transition"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let body = r#"{"to":"filed","actor":"zhang"}"#.to_owned();
    assert_eq!(status(post(&reader, body.clone()).await.unwrap()), 403);
    assert_eq!(status(post(&operator, body).await.unwrap()), 200);
    // The trace names the token that moved it (and whom the body names, as it differs).
    let trace = store.trace(1).unwrap();
    let moved = trace.iter().find(|t| t.detail.contains("→ filed")).unwrap();
    assert_eq!(moved.actor, "operator:dispatcher zhang for zhang", "{trace:?}");
    // The scheme is case-insensitive (RFC 7235).
    let lower = client
        .get(format!("{base}/api/v1/cases"))
        .header("authorization", format!("bearer {reader}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status().as_u16(), 200);
    // A token in a URL is refused everywhere but on the event stream, even an operator's on a
    // move: URLs end up in logs and histories.
    for (method, path) in [("GET", "/api/v1/cases"), ("POST", "/api/v1/cases/1/transition")] {
        let url = format!("{base}{path}?access_token={operator}");
        let r = match method {
            "GET" => client.get(url).send().await.unwrap(),
            _ => client
                .post(url)
                .header("content-type", "application/json")
                .body(r#"{"to":"dispatched","actor":"zhang"}"#)
                .send()
                .await
                .unwrap(),
        };
        assert_eq!(r.status().as_u16(), 400, "{method} {path}");
        assert!(r.text().await.unwrap().contains("event stream"));
    }
    assert_eq!(store.case(1).unwrap().unwrap().state, "filed", "the move in the URL did nothing");
    // Oversized bodies are refused before parsing.
    let huge = format!(r#"{{"to":"dispatched","actor":"zhang","note":"{}"}}"#, "x".repeat(100_000));
    assert_eq!(status(post(&operator, huge).await.unwrap()), 413);
    // The event stream takes the token in its query.
    assert_eq!(status(get("/api/v1/events", None).await.unwrap()), 401);
    let events =
        client.get(format!("{base}/api/v1/events?access_token={reader}")).send().await.unwrap();
    assert_eq!(events.status().as_u16(), 200);
    drop(events);
    // A revoked token stops working at once.
    cli(&["tokens", "revoke", "wall screen"]);
    assert_eq!(status(get("/api/v1/devices", Some(&reader)).await.unwrap()), 401);
    assert_eq!(status(get("/api/v1/devices", Some(&operator)).await.unwrap()), 200);

    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}

/// Slow clients: a connection that sends nothing, or its headers a byte at a time, is closed
/// after `http.header_timeout_ms`; at most `http.max_connections` are open at once, the rest
/// wait in the listen queue — and a real request is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_capped() {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = Mosquitto::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    fixtures::city(dir.path(), 96, Counts { covers: 1, drains: 0, beacons: 0 }).unwrap();
    let mut config = common::config(dir.path(), broker.addr());
    config.http.header_timeout_ms = 500;
    config.http.max_connections = 5;
    common::import(&config, dir.path());
    let (gateway, stop_tx) = common::start(&config, app::wall_clock()).await;
    let addr = gateway.http.unwrap();
    // 20 silent connections and one that dribbles its headers a byte every 100 ms.
    let started = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let dribble = tokio::spawn(async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" {
            if c.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Written in full (3.6 s): the server must have closed it long before.
        let mut buf = Vec::new();
        !(c.read_to_end(&mut buf).await.is_ok() && buf.starts_with(b"HTTP/1.1 200"))
    });
    let mut most = 0;
    let mut closed = 0;
    for c in &mut silent {
        let mut buf = [0u8; 1];
        // Each is accepted once a slot frees, then closed after the header timeout: EOF.
        let eof = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                most = most.max(gateway.status.http_connections.load(Relaxed));
                match tokio::time::timeout(Duration::from_millis(20), c.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => return true,
                    Ok(Ok(_)) => return false,
                    Err(_) => {}
                }
            }
        })
        .await;
        if eof == Ok(true) {
            closed += 1;
        }
    }
    assert_eq!(closed, 20, "silent connections left open");
    assert!(most <= 5, "{most} connections open at once, above the cap of 5");
    assert!(dribble.await.unwrap(), "a client sending a header byte every 100 ms was served");
    let ok = reqwest::get(format!("http://{addr}/healthz")).await.unwrap();
    assert_eq!(ok.status().as_u16(), 200, "a real request after the slow ones");
    gridsense_tests::evidence!(
        "edge: http 20 silent connections + 1 dribbling headers: all closed by the server within {:?} (header timeout 500 ms, cap 5, at most {most} open at once); a real request answered after",
        started.elapsed()
    );
    stop_tx.send(true).unwrap();
    gateway.task.await.unwrap().unwrap();
}
