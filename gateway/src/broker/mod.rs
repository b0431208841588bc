//! Brokers: parsing `mqtt://` URLs, and the embedded broker (rumqttd) that serves as the
//! zero-install default, on loopback only, with three listeners:
//! - **devices** (MQTT 5; the firmware's client speaks MQTT 5): a client id is bound to its
//!   account — a device must log in with its EUI as both user name and client id, as
//!   Mosquitto's `use_username_as_clientid` does — so no device can take another client's id;
//! - **gateway** (MQTT 5): only the gateway's own session, under a client id and password made
//!   at random when the process starts (the embedded broker keeps no session across a restart
//!   of the process anyway), so nobody can take the gateway's session over;
//! - **clients** (MQTT 3.1.1): tools such as the simulator's pooled load or a test's
//!   subscriber, anonymous. They cannot take the gateway's id: they do not know it.
//!
//! Every listener refuses packets above [`MAX_MESSAGE_BYTES`] before reading them (the
//! publisher is disconnected), so nothing larger than the gateway's Maximum Packet Size can
//! reach it: rumqttd does not honour a client's Maximum Packet Size itself.

pub mod provision;

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

pub use crate::config::{UrlError, is_tls, parse_url};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The largest MQTT packet (after its fixed header) the embedded broker reads, bytes: far above
/// the largest frame (484 bytes, plus a 36-byte topic and a few header bytes), far below the
/// gateway's Maximum Packet Size (`mqtt.max_packet_bytes`, default 65,536). The shipped
/// Mosquitto configuration has the same limit (`message_size_limit 4096`).
pub const MAX_MESSAGE_BYTES: usize = 4_096;

/// The running embedded broker.
#[derive(Clone, PartialEq, Eq)]
pub struct Embedded {
    /// MQTT 5 listener, for devices (client id = user name = EUI).
    pub devices: SocketAddr,
    /// MQTT 5 listener for the gateway's session only.
    pub gateway: SocketAddr,
    /// The gateway's client id, user name and password on `gateway`.
    pub gateway_login: (String, String, String),
    /// MQTT 3.1.1 listener, for tools (anonymous).
    pub clients: SocketAddr,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("devices", &self.devices)
            .field("gateway", &self.gateway)
            .field("clients", &self.clients)
            .finish_non_exhaustive()
    }
}

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No free port or a bind failure.
    #[error("embedded broker: {0}")]
    Io(#[from] std::io::Error),
    /// It did not start listening.
    #[error("embedded broker did not listen on {0} within 10 s")]
    NotListening(SocketAddr),
}

fn settings(
    name: &str,
    listen: SocketAddr,
    auth: Option<rumqttd::AuthHandler>,
) -> rumqttd::ServerSettings {
    rumqttd::ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        // No pause between accepts: with 1 ms, 5,000 devices connecting at once (`gridsense
        // demo --devices 5000`) made 4,290 connections with 2,789 failed attempts and 4,130
        // devices online after 30 s; with none, all 5,000 online (1,344 failed attempts).
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: MAX_MESSAGE_BYTES,
            max_inflight_count: 1_000,
            auth: None,
            external_auth: auth,
            dynamic_filters: true,
        },
    }
}

/// Whether a device's login binds its client id: the id must be its user name, and a device's
/// user name is its EUI (16 lowercase hex digits).
pub fn device_login_ok(client_id: &str, username: &str) -> bool {
    client_id == username
        && client_id.len() == 16
        && client_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_hex() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

fn handler(f: impl Fn(&str, &str, &str) -> bool + Send + Sync + 'static) -> rumqttd::AuthHandler {
    std::sync::Arc::new(move |id: String, user: String, pass: String| {
        let ok = f(&id, &user, &pass);
        Box::pin(async move { ok })
    })
}

/// Starts rumqttd on loopback (port 0: a free one) on its own thread; it runs until the
/// process exits.
pub fn start_embedded(device_port: u16, client_port: u16) -> Result<Embedded, StartError> {
    let pick = |p: u16| if p == 0 { free_port() } else { Ok(p) };
    let devices = SocketAddr::from(([127, 0, 0, 1], pick(device_port)?));
    let clients = SocketAddr::from(([127, 0, 0, 1], pick(client_port)?));
    let gateway = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let login = (
        format!("gridsense-gateway-{}", random_hex()?),
        "gridsense-gateway".to_owned(),
        random_hex()?,
    );
    let expected = login.clone();
    // One session per shard and lane (and the legacy one): the client id and the user name
    // are the gateway's with the same session suffix (`-SS-up`, `-legacy`, …).
    let gateway_auth = handler(move |id, user, pass| {
        use subtle::ConstantTimeEq;
        let suffix = |name: &str, base: &str| name.strip_prefix(base).map(str::to_owned);
        let (a, b) = (suffix(id, &expected.0), suffix(user, &expected.1));
        a.is_some()
            && a == b
            && a.as_deref().is_some_and(|s| s.is_empty() || s.starts_with('-'))
            && bool::from(pass.as_bytes().ct_eq(expected.2.as_bytes()))
    });
    let device_auth = handler(|id, user, _| device_login_ok(id, user));
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100_000,
            max_outgoing_packet_count: 1_000,
            max_segment_size: 4 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("clients".to_owned(), settings("clients", clients, None))])),
        v5: Some(HashMap::from([
            ("devices".to_owned(), settings("devices", devices, Some(device_auth))),
            ("gateway".to_owned(), settings("gateway", gateway, Some(gateway_auth))),
        ])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new().name("embedded-broker".into()).spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        if let Err(e) = broker.start() {
            tracing::error!("embedded broker stopped: {e}");
        }
    })?;
    for addr in [devices, gateway, clients] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(StartError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Embedded { devices, gateway, gateway_login: login, clients })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One number for the edge's limit: the shipped Mosquitto configuration refuses packets
    /// above the same size as the embedded broker.
    #[test]
    fn the_shipped_mosquitto_limit_is_the_embedded_brokers() {
        let shipped = include_str!("../../../deploy/mosquitto.conf");
        let line = shipped.lines().find(|l| l.starts_with("max_packet_size ")).unwrap();
        assert_eq!(line, format!("max_packet_size {MAX_MESSAGE_BYTES}"));
        let gateway = crate::config::Config::default().mqtt.max_packet_bytes;
        assert!(
            MAX_MESSAGE_BYTES < usize::try_from(gateway).unwrap(),
            "below the gateway's Maximum Packet Size"
        );
    }

    #[test]
    fn urls_parse_or_say_why_not() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1883").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 1883))
        );
        for bad in [
            "127.0.0.1:1883",
            "http://127.0.0.1:1",
            "mqtt://127.0.0.1",
            "mqtt://a@b:1",
            "mqtt://x:1/t",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
