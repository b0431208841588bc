//! An independent subscriber: records every frame on the uplink topics — version 1's
//! `gridsense/+/up` and both lanes of every shard — and decodes it with the protocol crate and
//! the inventory's keys, as the gateway would.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Result, bail};
use gridsense_protocol::{
    DeviceKey, Eui, Header, Uplink, open,
    topic::{Lane, UPLINK_FILTER, all_shards_filter},
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// One frame as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The topic it came on.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A running subscriber.
#[derive(Debug)]
pub struct Subscriber {
    frames: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects (MQTT 3.1.1, rumqttc) to `broker` and subscribes to every uplink; returns once
    /// the subscription is acknowledged.
    pub async fn start(broker: SocketAddr) -> Result<Self> {
        Self::connect(broker, None).await
    }

    /// As [`Subscriber::start`], over TLS, trusting the CA in `ca_file` (the broker's
    /// certificate must name 127.0.0.1).
    pub async fn start_tls(broker: SocketAddr, ca_file: &std::path::Path) -> Result<Self> {
        Self::connect(broker, Some(ca_file)).await
    }

    async fn connect(broker: SocketAddr, ca_file: Option<&std::path::Path>) -> Result<Self> {
        let mut options = MqttOptions::new(
            format!("test-subscriber-{}", std::process::id()),
            broker.ip().to_string(),
            broker.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        if let Some(ca) = ca_file {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(gridsense_simulator::tls::client_config(ca)?),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let lanes = [Lane::Up, Lane::Urgent].map(|l| all_shards_filter(l).as_str().to_owned());
        let filters = [UPLINK_FILTER.to_owned(), lanes[0].clone(), lanes[1].clone()];
        client
            .subscribe_many(filters.map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce)))
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        bail!("subscription refused");
                    }
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("subscriber: {e}"),
                Err(_) => bail!("subscriber: no SUBACK within 10 s"),
            }
        }
        let frames = Arc::new(Mutex::new(Vec::new()));
        let sink = frames.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(mut v) = sink.lock() {
                            v.push(Received {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Ok(Subscriber { frames, task })
    }

    /// Everything received so far.
    pub fn frames(&self) -> Vec<Received> {
        self.frames.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Decodes every frame from a device in `keys`, in arrival order; frames that do not
    /// verify are left out.
    pub fn decoded(&self, keys: &HashMap<Eui, DeviceKey>) -> Vec<(Header, Uplink)> {
        self.frames()
            .iter()
            .filter_map(|r| {
                let (eui, _) = gridsense_protocol::topic::parse_topic(&r.topic).ok()?;
                let key = keys.get(&eui)?;
                open::<Uplink>(&r.payload, key).ok()
            })
            .collect()
    }

    /// Waits until no frame has arrived for `quiet`, at most `max`.
    pub async fn settle(&self, quiet: Duration, max: Duration) {
        let end = tokio::time::Instant::now() + max;
        let mut last = self.frames().len();
        while tokio::time::Instant::now() < end {
            tokio::time::sleep(quiet).await;
            let now = self.frames().len();
            if now == last {
                return;
            }
            last = now;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
