//! VictoriaMetrics (Debian's `victoria-metrics`), which serves the InfluxDB 2 write API, per test
//! on a free loopback port, with no de-duplication so a duplicate write would show.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::broker::free_port;

/// A running (or stopped) VictoriaMetrics with its own data folder.
#[derive(Debug)]
pub struct VictoriaMetrics {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// One stored series: its labels and samples (timestamp ms, value).
pub type Series = (BTreeMap<String, String>, Vec<(i64, f64)>);

impl VictoriaMetrics {
    /// Starts one on a free port.
    pub fn start() -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut vm = VictoriaMetrics { child: None, addr, dir: tempfile::tempdir()? };
        vm.restart()?;
        Ok(vm)
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process id (0 once stopped), for measuring its CPU.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Starts it again (same port, same data) after [`Self::stop`].
    pub fn restart(&mut self) -> Result<()> {
        let binary = "/usr/bin/victoria-metrics";
        if !std::path::Path::new(binary).exists() {
            bail!("{binary} is missing: run scripts/test, which installs it");
        }
        let child = Command::new(binary)
            .arg(format!("-httpListenAddr={}", self.addr))
            .arg(format!("-storageDataPath={}", self.dir.path().display()))
            // The default retention (1 month) silently drops older timestamps.
            .arg("-retentionPeriod=100y")
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting victoria-metrics")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!("victoria-metrics did not listen on {} within 20 s", self.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops it cleanly (SIGTERM: it flushes what it has accepted).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Every series whose name matches the regex, after flushing.
    pub async fn export(&self, name_regex: &str) -> Result<Vec<Series>> {
        let http = reqwest::Client::new();
        http.get(format!("{}/internal/force_flush", self.url()))
            .send()
            .await?
            .error_for_status()?;
        let text = http
            .get(format!("{}/api/v1/export", self.url()))
            // Every time, including a little future: export defaults to ending now.
            .query(&[
                ("match[]", format!("{{__name__=~\"{name_regex}\"}}")),
                ("start", "0".to_owned()),
                ("end", (now_s() + 3 * 86_400).to_string()),
            ])
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line)?;
                let labels = v
                    .get("metric")
                    .and_then(serde_json::Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let empty = Vec::new();
                let values =
                    v.get("values").and_then(serde_json::Value::as_array).unwrap_or(&empty);
                let times =
                    v.get("timestamps").and_then(serde_json::Value::as_array).unwrap_or(&empty);
                let samples = times
                    .iter()
                    .zip(values)
                    .map(|(t, v)| (t.as_i64().unwrap_or_default(), v.as_f64().unwrap_or_default()))
                    .collect();
                Ok((labels, samples))
            })
            .collect()
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
