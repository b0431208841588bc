//! A real headless Chromium (Debian's `chromium`) driven over the Chrome DevTools Protocol:
//! started per test on a free loopback port with its own profile, stopped when dropped. Just
//! what the dashboard tests need: navigate, evaluate JavaScript (awaiting promises), wait for a
//! condition, read console errors, take a PNG screenshot.

// Indexing a `serde_json::Value` yields `Null` for what is missing; it never panics.
#![allow(clippy::indexing_slicing)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};

/// The browser binary `scripts/test` installs.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium with one page.
pub struct Chromium {
    child: Child,
    page: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Console errors and uncaught exceptions seen so far.
    pub errors: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
}

impl std::fmt::Debug for Chromium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chromium").field("pid", &self.child.id()).finish_non_exhaustive()
    }
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    // DevTools keeps the connection open: read the headers, then Content-Length bytes.
    let mut reader = BufReader::new(s);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8(body)?)
}

impl Chromium {
    /// Starts Chromium headless with a `width`×`height` window.
    pub fn start(width: u32, height: u32) -> Result<Self> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.path().display()),
                &format!("--window-size={width},{height}"),
                "about:blank",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {CHROMIUM} (scripts/test installs it)"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Read the DevTools address, then keep draining so Chromium never blocks on the pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let browser_url = rx
            .recv_timeout(Duration::from_secs(30))
            .context("Chromium did not print its DevTools address")?;
        let port: u16 = browser_url
            .strip_prefix("ws://127.0.0.1:")
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("unexpected DevTools address {browser_url}"))?;
        let targets: Value = serde_json::from_str(&http_get(port, "/json/list")?)?;
        let page_url = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .ok_or_else(|| anyhow!("no page target in {targets}"))?
            .to_owned();
        let (page, _) = tungstenite::connect(page_url.as_str())?;
        let mut browser =
            Chromium { child, page, next_id: 0, errors: Arc::default(), _profile: profile };
        browser.call("Runtime.enable", json!({}))?;
        browser.call("Page.enable", json!({}))?;
        Ok(browser)
    }

    /// Sends a command and returns its result; events read meanwhile are recorded.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.page.send(Message::text(
            json!({ "id": id, "method": method, "params": params }).to_string(),
        ))?;
        loop {
            let msg = self.page.read()?;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            match v["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    self.record(format!("exception: {}", v["params"]["exceptionDetails"]))
                }
                Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                    self.record(format!("console.error: {}", v["params"]["args"]));
                }
                _ => {}
            }
        }
    }

    fn record(&self, e: String) {
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(e);
        }
    }

    /// Opens `url` in the page.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        self.call("Page.navigate", json!({ "url": url }))?;
        Ok(())
    }

    /// Evaluates a JavaScript expression (awaiting a promise) and returns its value.
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` until it is truthy; returns its value and how long it took.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration) -> Result<(Value, Duration)> {
        let start = Instant::now();
        loop {
            let v = self.eval(expression).unwrap_or(Value::Null);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return Ok((v, start.elapsed()));
            }
            if start.elapsed() > timeout {
                bail!(
                    "waited {timeout:?} for {expression}; console: {:?}",
                    self.errors.lock().map(|e| e.clone())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A PNG screenshot of the page as shown.
    pub fn screenshot(&mut self) -> Result<Vec<u8>> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }))?;
        let data = r["data"].as_str().ok_or_else(|| anyhow!("no screenshot data"))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
