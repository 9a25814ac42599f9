//! Fault-injection proxies on the peer links.
//!
//! Every node gets one proxy in front of its peer port, and the topology
//! publishes the proxy's address as the node's peer address, so every
//! node-to-node request of the cluster goes through the proxy of its
//! destination. Internal requests name their sender in the `X-Kv-Node`
//! header; a proxy reads the head of the first request of each connection
//! (keep-alive connections carry one sender's requests only) before it
//! forwards anything, and so knows the link `(source, destination)`.
//!
//! The [`Net`] they share says which links are cut and which nodes are slow:
//! - a **partition** separates a set of nodes from the rest, both ways: the
//!   proxy stops forwarding on a cut link (like dropped packets: the sender
//!   times out) and resumes when it heals;
//! - a **slow** node gets a delay on every chunk forwarded to or from it.
//!
//! Connections whose head names no sender (the control plane talks to the
//! real peer port, so none should come) are never cut.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Largest request head read to find the sender.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on loopback: {0}")]
    Listen(std::io::Error),
}

/// Which links are faulty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetFaults {
    /// Nodes cut off from every node outside this set.
    pub partitioned: BTreeSet<u32>,
    /// Added delay per forwarded chunk to and from a node.
    pub slow: BTreeMap<u32, Duration>,
}

impl NetFaults {
    /// Is the link between `src` and `dst` cut?
    pub fn blocked(&self, src: Option<u32>, dst: u32) -> bool {
        match src {
            Some(s) if s != dst => self.partitioned.contains(&s) != self.partitioned.contains(&dst),
            _ => false,
        }
    }

    /// The delay on the link between `src` and `dst`.
    pub fn delay(&self, src: Option<u32>, dst: u32) -> Duration {
        let d = self.slow.get(&dst).copied().unwrap_or_default();
        let s = src
            .and_then(|s| self.slow.get(&s).copied())
            .unwrap_or_default();
        d.max(s)
    }
}

/// The faults every proxy follows; changes apply to open connections too.
pub struct Net {
    faults: watch::Sender<NetFaults>,
    stats: std::sync::Mutex<NetStats>,
}

/// What the proxies saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Connections forwarded, by `(source, destination)` link.
    pub connections: BTreeMap<(u32, u32), u64>,
    /// Connections whose head named no sender.
    pub anonymous: u64,
    /// Times a connection stalled on a cut link.
    pub stalled: u64,
    /// Chunks forwarded late on a slow link.
    pub delayed: u64,
}

impl Net {
    pub fn new() -> Arc<Net> {
        Arc::new(Net {
            faults: watch::Sender::new(NetFaults::default()),
            stats: std::sync::Mutex::new(NetStats::default()),
        })
    }

    pub fn stats(&self) -> NetStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn count(&self, f: impl FnOnce(&mut NetStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn set(&self, f: impl FnOnce(&mut NetFaults)) {
        self.faults.send_modify(f);
    }

    pub fn faults(&self) -> NetFaults {
        self.faults.borrow().clone()
    }

    /// Clears every fault.
    pub fn heal(&self) {
        self.faults.send_replace(NetFaults::default());
    }
}

/// A proxy in front of node `dst`'s peer port; runs until dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(dst: u32, upstream: SocketAddr, net: Arc<Net>) -> Result<Proxy, ProxyError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(ProxyError::Listen)?;
        let addr = listener.local_addr().map_err(ProxyError::Listen)?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = conn.set_nodelay(true);
                tokio::spawn(serve(conn, dst, upstream, net.clone()));
            }
        });
        Ok(Proxy { addr, task })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The sender ordinal named by an `X-Kv-Node` header in a request head.
pub fn sender_of(head: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("x-kv-node") {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

async fn serve(mut client: TcpStream, dst: u32, upstream: SocketAddr, net: Arc<Net>) {
    let mut faults = net.faults.subscribe();
    // Read the first request's head (bounded in size and time).
    let mut head = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read_head = async {
        loop {
            if head_end(&head).is_some() || head.len() > MAX_HEAD {
                return true;
            }
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), read_head).await {
        Ok(true) => {}
        _ => return,
    }
    let src = sender_of(&head[..head_end(&head).unwrap_or(head.len())]);
    net.count(|s| match src {
        Some(src) => *s.connections.entry((src, dst)).or_insert(0) += 1,
        None => s.anonymous += 1,
    });
    // A cut link: hold the connection silent until it heals.
    if !wait_open(&net, &mut faults, src, dst).await {
        return;
    }
    let Ok(Ok(mut server)) =
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(upstream)).await
    else {
        return;
    };
    let _ = server.set_nodelay(true);
    pause(&net, &faults, src, dst).await;
    if server.write_all(&head).await.is_err() {
        return;
    }
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = cr.read(&mut up) => {
                let Ok(n @ 1..) = n else { break };
                if !wait_open(&net, &mut faults, src, dst).await { break; }
                pause(&net, &faults, src, dst).await;
                if sw.write_all(&up[..n]).await.is_err() { break; }
            }
            n = sr.read(&mut down) => {
                let Ok(n @ 1..) = n else { break };
                if !wait_open(&net, &mut faults, src, dst).await { break; }
                pause(&net, &faults, src, dst).await;
                if cw.write_all(&down[..n]).await.is_err() { break; }
            }
            changed = faults.changed() => {
                if changed.is_err() { break; }
                // A new partition stalls this connection at its next chunk.
            }
        }
    }
}

/// Sleeps the link's delay, if it is slow.
async fn pause(net: &Net, faults: &watch::Receiver<NetFaults>, src: Option<u32>, dst: u32) {
    let delay = faults.borrow().delay(src, dst);
    if !delay.is_zero() {
        net.count(|s| s.delayed += 1);
        tokio::time::sleep(delay).await;
    }
}

/// Waits while the link is cut; false when the fault source went away.
async fn wait_open(
    net: &Net,
    faults: &mut watch::Receiver<NetFaults>,
    src: Option<u32>,
    dst: u32,
) -> bool {
    let mut counted = false;
    loop {
        if !faults.borrow_and_update().blocked(src, dst) {
            return true;
        }
        if !counted {
            counted = true;
            net.count(|s| s.stalled += 1);
        }
        if faults.changed().await.is_err() {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sender_is_read_from_the_request_head() {
        let head =
            b"POST /internal/v1/apply HTTP/1.1\r\nhost: x\r\nX-Kv-Node: 3\r\nx-kv-epoch: 9\r\n\r\n";
        assert_eq!(sender_of(head), Some(3));
        assert_eq!(sender_of(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"), None);
        assert_eq!(
            sender_of(b"GET / HTTP/1.1\r\nx-kv-node: nope\r\n\r\n"),
            None
        );
    }

    #[test]
    fn a_partition_cuts_both_ways_only_across_the_split() {
        let mut f = NetFaults::default();
        f.partitioned.insert(2);
        assert!(f.blocked(Some(2), 0));
        assert!(f.blocked(Some(0), 2));
        assert!(!f.blocked(Some(0), 1));
        assert!(!f.blocked(Some(2), 2));
        assert!(!f.blocked(None, 2));
        f.slow.insert(1, Duration::from_millis(50));
        assert_eq!(f.delay(Some(1), 0), Duration::from_millis(50));
        assert_eq!(f.delay(Some(0), 1), Duration::from_millis(50));
        assert_eq!(f.delay(Some(0), 2), Duration::ZERO);
    }
}
