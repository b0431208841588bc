//! Brokers started per test on free loopback ports.

use std::{
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A free TCP port on 127.0.0.1 (bound and released; the kernel does not hand it out again at
/// once).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn wait_until_listening(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not start listening on {addr} within 10 s")
}

/// A Mosquitto broker on a free loopback port, killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts one with the test configuration: anonymous access, large in-flight and queue
    /// limits (Mosquitto drops silently past them), no persistence.
    pub fn start() -> Result<Self> {
        Self::start_with("")
    }

    /// Starts one that admits only the accounts of a password file, restricted by an ACL file.
    pub fn start_secured(
        password_file: &std::path::Path,
        acl_file: &std::path::Path,
    ) -> Result<Self> {
        Self::start_config(&format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n",
            password_file.display(),
            acl_file.display()
        ))
    }

    /// Starts one with extra configuration lines (anonymous access allowed).
    pub fn start_with(extra: &str) -> Result<Self> {
        Self::start_config(&format!("allow_anonymous true\n{extra}"))
    }

    /// Starts one that keeps persistent sessions and their queued messages across a restart
    /// (`persistence true` in its own folder; saved on a clean SIGTERM, and every second).
    pub fn start_persistent() -> Result<Self> {
        Self::start_config("allow_anonymous true\npersistence true\nautosave_interval 1\n")
    }

    /// Starts one from a shipped configuration file (`deploy/mosquitto.conf`): its one
    /// `listener` line moves to a free loopback port, `persistence_location` to a private
    /// folder, and each shipped path in `paths` is replaced by a test file (certificates,
    /// password file, ACL). Everything else is used as shipped.
    pub fn start_shipped(
        shipped: &std::path::Path,
        paths: &[(&str, &std::path::Path)],
    ) -> Result<Self> {
        let text = fs::read_to_string(shipped)
            .with_context(|| format!("reading {}", shipped.display()))?;
        let mut lines = Vec::new();
        let mut listeners = 0;
        for line in text.lines() {
            let mut line = line.to_owned();
            if line.starts_with("listener ") {
                listeners += 1;
                line = "listener {port} 127.0.0.1".to_owned();
            } else if line.starts_with("persistence_location ") {
                line = "persistence_location {dir}/".to_owned();
            }
            for (from, to) in paths {
                line = line.replace(from, &to.display().to_string());
            }
            lines.push(line);
        }
        if listeners != 1 {
            bail!("{}: expected one listener line, found {listeners}", shipped.display());
        }
        Self::start_text(&format!("user root\nlog_dest stderr\n{}\n", lines.join("\n")))
    }

    fn start_config(access: &str) -> Result<Self> {
        // `user root`: started as root it would otherwise drop privileges before opening the
        // files in this private temp folder (PITFALLS.md). A later `persistence true` line
        // overrides the default off.
        Self::start_text(&format!(
            "listener {{port}} 127.0.0.1\nuser root\npersistence false\npersistence_location {{dir}}/\n\
             max_inflight_messages 1000\nmax_queued_messages 1000000\nmax_queued_bytes 0\n\
             log_dest stderr\nlog_type error\nlog_type warning\n{access}\n"
        ))
    }

    /// Starts one with `template` as its configuration, `{port}` and `{dir}` filled in.
    fn start_text(template: &str) -> Result<Self> {
        let port = free_port()?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("mosquitto.conf");
        let text = template
            .replace("{port}", &port.to_string())
            .replace("{dir}", &dir.path().display().to_string());
        fs::write(&config, text)?;
        let binary = PathBuf::from("/usr/sbin/mosquitto");
        if !binary.exists() {
            bail!("/usr/sbin/mosquitto is missing: run scripts/test, which installs it");
        }
        let log = fs::File::create(dir.path().join("mosquitto.log"))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting mosquitto")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let broker = Mosquitto { child, addr, dir };
        wait_until_listening(addr, "mosquitto")?;
        Ok(broker)
    }

    /// Stops it cleanly (SIGTERM: a persistent broker saves its state), waits `down`, and
    /// starts it again on the same port with the same configuration.
    pub fn restart(&mut self, down: Duration) -> Result<()> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        self.child.wait()?;
        std::thread::sleep(down);
        let log =
            fs::OpenOptions::new().append(true).open(self.dir.path().join("mosquitto.log"))?;
        self.child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("restarting mosquitto")?;
        wait_until_listening(self.addr, "mosquitto")
    }

    /// `kill -9`: gone at once, whatever it had acknowledged and not delivered with it. It is
    /// not started again.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Its process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
