//! Paced "cover removed" alarms, for alarm → case latency measurements.

use std::collections::HashMap;

use anyhow::Result;
use gridsense_protocol::{
    AlarmKind, AlarmRaised, DeviceTime, Uplink, seal,
    topic::{Lane, uplink_topic},
};
use gridsense_simulator::inventory::Device;
use rumqttc::{AsyncClient, QoS};

/// The alarm a cover sends when it is lifted off its frame.
pub fn cover_removed(at: DeviceTime) -> Uplink {
    Uplink::AlarmRaised(AlarmRaised { kind: AlarmKind::CoverRemoved, value: 1_750, since: at })
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Publishes one "cover removed" alarm (QoS 1) for each cover on its shard's urgent lane (a
/// deployment of `shards`), as a device on the sharded topics sends it, `rate` per second,
/// until the covers run out or `until` comes. Returns, per cover published (EUI as text), the
/// wall-clock time it was published, Unix ms.
pub async fn publish_paced<'a>(
    client: &AsyncClient,
    covers: impl IntoIterator<Item = &'a Device>,
    (rate, shards): (f64, u16),
    until: Option<tokio::time::Instant>,
) -> Result<HashMap<String, i64>> {
    let mut sent = HashMap::new();
    let interval = std::time::Duration::from_secs_f64(1.0 / rate);
    let at = DeviceTime::from_unix_secs(u64::try_from(wall_ms() / 1000)?).unwrap_or_default();
    let mut next = tokio::time::Instant::now();
    for d in covers {
        if until.is_some_and(|u| next >= u) {
            break;
        }
        tokio::time::sleep_until(next).await;
        next += interval;
        let frame = seal(d.eui, 1_000_000, &cover_removed(at), &d.key);
        sent.insert(d.eui.to_string(), wall_ms());
        let topic = uplink_topic(d.eui, shards, Lane::Urgent).to_string();
        client.publish(topic, QoS::AtLeastOnce, false, frame.to_vec()).await?;
    }
    Ok(sent)
}
