//! A TCP link on a free loopback port in front of a server, which a test can hold (nothing
//! passes either way; what was sent waits in the link) and cut (every connection closed,
//! whatever the link held discarded, new connections refused): a host that freezes and then
//! dies, with what it had acknowledged but not yet passed on.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// The link; dropped, it cuts.
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    held: Arc<AtomicBool>,
    cut: watch::Sender<bool>,
}

impl Link {
    /// Listens on a free loopback port and forwards every connection to `server`.
    pub async fn start(server: SocketAddr) -> Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let held = Arc::new(AtomicBool::new(false));
        let (cut, mut cut_rx) = watch::channel(false);
        let (h, c) = (held.clone(), cut_rx.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = cut_rx.changed() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                let Ok(upstream) = TcpStream::connect(server).await else { continue };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(pipe(cr, uw, h.clone(), c.clone()));
                tokio::spawn(pipe(ur, cw, h.clone(), c.clone()));
            }
        });
        Ok(Link { addr, held, cut })
    }

    /// Where clients connect.
    pub const fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Nothing passes until [`Link::release`]; what comes meanwhile waits.
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Passes again what waits and what comes.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// Closes every connection, discarding what was held; new ones are refused.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    held: Arc<AtomicBool>,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            n = from.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = cut.changed() => return,
        };
        while held.load(Ordering::SeqCst) {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = cut.changed() => return,
            }
        }
        if to.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
            return;
        }
    }
}
