//! `gridsense demo`, the README's main command, as a newcomer runs it: nothing but the binary.
//! It starts the embedded broker, the gateway and a simulated district, serves its status on
//! loopback while running, and ends with a summary in which the gateway accepted every frame
//! the devices sent.

// Test code: a panic is how a failure is reported.
#![allow(clippy::panic, clippy::indexing_slicing, clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
};

fn number_before(text: &str, marker: &str) -> u64 {
    let at = text.find(marker).unwrap_or_else(|| panic!("no {marker:?} in {text}"));
    text[..at]
        .split_whitespace()
        .last()
        .unwrap()
        .trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap()
}

#[test]
fn the_demo_runs_with_nothing_installed_and_accepts_every_frame() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gridsense"))
        .args(["demo", "--devices", "80", "--duration", "8s", "--http", "127.0.0.1:0"])
        .arg("--data")
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut url = None;
    let mut line = String::new();
    while url.is_none() && stderr.read_line(&mut line).unwrap() > 0 {
        if let Some(rest) = line.split("status page http://").nth(1) {
            url = rest.split('/').next().map(str::to_owned);
        }
        line.clear();
    }
    let addr = url.expect("the demo printed its status address");
    let status: serde_json::Value = http_get::get_json(&format!("http://{addr}/api/v1/status"));
    assert!(status["frames_accepted"].is_u64() && status["devices_registered"] == 80, "{status}");
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{rest}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let sent = number_before(&stdout, " frames (");
    let accepted = number_before(&stdout, " frames accepted");
    assert!(sent > 80, "{stdout}");
    assert_eq!(accepted, sent, "{stdout}");
    assert!(stdout.contains("rejected: none"), "{stdout}");
}

mod http_get {
    /// A tiny blocking GET of JSON over a plain TCP socket (HTTP/1.0), to keep the test free of
    /// an HTTP client runtime.
    pub fn get_json(url: &str) -> serde_json::Value {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut stream = std::net::TcpStream::connect(host).unwrap();
        write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let body = response.split("\r\n\r\n").nth(1).unwrap();
        serde_json::from_str(body).unwrap()
    }
}
