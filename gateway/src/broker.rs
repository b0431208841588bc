//! Brokers: parsing `mqtt://` URLs, and the embedded broker (rumqttd) that serves as the
//! zero-install default: an MQTT 5 listener for devices (the firmware's client speaks MQTT 5)
//! and an MQTT 3.1.1 listener for rumqttc clients such as the gateway itself. Loopback only.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    time::{Duration, Instant},
};

/// A broker URL that is not `mqtt://HOST:PORT`.
#[derive(Debug, thiserror::Error)]
#[error("{url:?} is not mqtt://HOST:PORT ({why})")]
pub struct UrlError {
    url: String,
    why: String,
}

/// `mqtt://HOST:PORT` to a socket address.
pub fn parse_url(url: &str) -> Result<SocketAddr, UrlError> {
    let bad = |why: &str| UrlError { url: url.to_owned(), why: why.to_owned() };
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("mqtts://"))
        .ok_or_else(|| bad("scheme must be mqtt:// or mqtts://"))?;
    if rest.contains('/') || rest.contains('@') || !rest.contains(':') {
        return Err(bad("expected HOST:PORT after the scheme"));
    }
    rest.to_socket_addrs().map_err(|e| bad(&e.to_string()))?.next().ok_or_else(|| bad("no address"))
}

/// Whether a broker URL asks for TLS.
pub fn is_tls(url: &str) -> bool {
    url.starts_with("mqtts://")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The running embedded broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Embedded {
    /// MQTT 5 listener, for devices.
    pub devices: SocketAddr,
    /// MQTT 3.1.1 listener, for rumqttc clients.
    pub clients: SocketAddr,
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

fn settings(name: &str, listen: SocketAddr) -> rumqttd::ServerSettings {
    rumqttd::ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 16 * 1024,
            max_inflight_count: 1_000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Starts rumqttd on loopback (port 0: a free one) on its own thread; it runs until the
/// process exits.
pub fn start_embedded(device_port: u16, client_port: u16) -> Result<Embedded, StartError> {
    let pick = |p: u16| if p == 0 { free_port() } else { Ok(p) };
    let devices = SocketAddr::from(([127, 0, 0, 1], pick(device_port)?));
    let clients = SocketAddr::from(([127, 0, 0, 1], pick(client_port)?));
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
        v4: Some(HashMap::from([("clients".to_owned(), settings("clients", clients))])),
        v5: Some(HashMap::from([("devices".to_owned(), settings("devices", devices))])),
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
    for addr in [devices, clients] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(StartError::NotListening(addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Embedded { devices, clients })
}

#[cfg(test)]
mod tests {
    use super::*;

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
