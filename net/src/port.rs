//! Loopback ports for processes we start.

use std::net::TcpListener;
use std::time::{SystemTime, UNIX_EPOCH};

/// A loopback port that was free a moment ago, for a process started next to
/// listen on. Taken below Linux's default ephemeral range (32768 and up), from
/// which outgoing connections draw their source ports: a port handed out by
/// the kernel (`bind :0`) can be taken by a connection before the node binds it
/// (seen as "Address already in use" at start under test load).
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // a start that differs between processes picking at the same time
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + seed.wrapping_add(n.wrapping_mul(7_919)) % SPAN;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            drop(l);
            return Ok(port as u16);
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_free_port_can_be_bound_and_is_below_the_ephemeral_range() {
        let p = super::free_port().unwrap();
        assert!((20_000..32_000).contains(&p), "{p}");
        std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    }
}
