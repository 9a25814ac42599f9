//! Loopback ports for processes we start.

use std::net::TcpListener;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where [`free_port`] hands out ports: below Linux's default ephemeral range
/// (32768 and up), from which outgoing connections draw their source ports,
/// so that no connection takes a port handed out before its process binds it
/// (seen as "Address already in use" at start under test load).
const LOW: u16 = 20_000;
const SPAN: u16 = 12_000;
/// Ports per block (see [`free_port`]); the first one is the block's lock.
const BLOCK: u16 = 40;
const BLOCKS: u16 = SPAN / BLOCK;

/// This process's blocks: their locks, held until it exits, and the block it
/// hands out from now.
struct Blocks {
    locks: Vec<(u16, socket2::Socket)>,
    current: Option<u16>,
    /// Next offset within `current` (0 is the lock).
    next: u16,
    /// Blocks tried so far, for the walk over them.
    tried: u32,
    seed: u32,
}

impl Blocks {
    fn new() -> Blocks {
        Blocks {
            locks: Vec::new(),
            current: None,
            next: 1,
            tried: 0,
            // Processes starting together begin their walks at different blocks.
            seed: std::process::id().wrapping_mul(2_654_435_761)
                ^ SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos()),
        }
    }
}

static BLOCKS_HELD: std::sync::Mutex<Option<Blocks>> = std::sync::Mutex::new(None);

fn lock_port(block: u16) -> u16 {
    LOW + block * BLOCK
}

/// Binds `port` on 127.0.0.1 without `SO_REUSEADDR` and without listening:
/// every other bind of it fails, and a connection to it is refused.
fn hold(port: u16) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A loopback port that was free a moment ago, for a process started next to
/// listen on.
///
/// The range is cut into blocks of [`BLOCK`] ports. A process first takes a
/// block of its own by binding the block's first port (held, not listening,
/// until the process exits), then hands out the block's other ports one by
/// one, never the same twice. Another process, finding that port bound,
/// takes another block: so two live processes never hand out the same port,
/// even though a port handed out but not yet bound passes the bind check
/// (seen: a `kvctl up` whose gateway port a node of another cluster took
/// while the first issued its certificates; a node restarted on its saved
/// port that another process had just handed out).
pub fn free_port() -> std::io::Result<u16> {
    let mut guard = BLOCKS_HELD.lock().unwrap_or_else(|p| p.into_inner());
    let blocks = guard.get_or_insert_with(Blocks::new);
    loop {
        if let Some(b) = blocks.current {
            while blocks.next < BLOCK {
                let port = lock_port(b) + blocks.next;
                blocks.next += 1;
                // Bound as a reservation would be: a port with connections of
                // an earlier server still in TIME_WAIT is skipped, as
                // [`reserve`] could not hold it.
                if hold(port).is_ok() {
                    return Ok(port);
                }
            }
            blocks.current = None;
        }
        // A walk with a stride coprime with BLOCKS visits every block once;
        // blocks this process holds already fail their bind like any other.
        if blocks.tried >= u32::from(BLOCKS) {
            break;
        }
        let b = ((blocks.seed % u32::from(BLOCKS) + blocks.tried * 7) % u32::from(BLOCKS)) as u16;
        blocks.tried += 1;
        if let Ok(lock) = hold(lock_port(b)) {
            blocks.locks.push((b, lock));
            blocks.current = Some(b);
            blocks.next = 1;
        }
    }
    // Every block taken: any port the kernel gives.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// Takes the block of `port`, a port handed out by another process before
/// (a `kvctl up` started again finds its nodes' ports in its state file), so
/// that no live process hands it out. `false` if another process holds that
/// block: `port` may then be handed out to it (or it is outside the range).
pub fn hold_block_of(port: u16) -> bool {
    if !(LOW..LOW + SPAN).contains(&port) {
        return false;
    }
    let b = (port - LOW) / BLOCK;
    let mut guard = BLOCKS_HELD.lock().unwrap_or_else(|p| p.into_inner());
    let blocks = guard.get_or_insert_with(Blocks::new);
    if blocks.locks.iter().any(|(held, _)| *held == b) {
        return true;
    }
    match hold(lock_port(b)) {
        Ok(lock) => {
            blocks.locks.push((b, lock));
            true
        }
        Err(_) => false,
    }
}

/// A port held for a process started later: bound on 127.0.0.1 without
/// listening and without `SO_REUSEADDR`, so no other bind takes it (a
/// connection to it is refused) until the reservation is dropped, right
/// before that process binds it itself.
#[derive(Debug)]
pub struct Reservation {
    port: u16,
    _socket: socket2::Socket,
}

impl Reservation {
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A [`free_port`] held until the [`Reservation`] is dropped. The window in
/// which another process may bind a port handed out (seen: two `kvctl up`
/// clusters of one test binary, the second started while the first issued
/// its certificates, and a node that then never started) shrinks from
/// "until the node starts" to the moment between the drop and its bind.
pub fn reserve() -> std::io::Result<Reservation> {
    let mut last = None;
    for _ in 0..16 {
        let port = free_port()?;
        match hold(port) {
            Ok(socket) => {
                return Ok(Reservation {
                    port,
                    _socket: socket,
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free loopback port")))
}

/// The address `addr` names (a port 0 made concrete), if no socket listens
/// there: bound for a moment without listening, so that a client probing the
/// port meanwhile is refused rather than queued on a socket about to close
/// (and then reset).
pub fn probe(addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As a listener would bind: connections of an earlier server there
    // waiting out TIME_WAIT do not count.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP address"))
}

/// A listener on `addr` that other processes of this user may bind too
/// (`SO_REUSEPORT`): the kernel then spreads new connections over every
/// socket bound there, and a socket that closes simply stops getting any.
/// How `kvctl up`'s Up nodes share the gateway's port. Linux only: elsewhere
/// the option does not spread connections.
#[cfg(target_os = "linux")]
pub fn bind_shared(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Makes the kernel hand every new connection on `listener`'s shared port
/// to the socket in slot `slot` of the port's group (a one-instruction
/// classic BPF program, `SO_ATTACH_REUSEPORT_CBPF`) instead of spreading
/// them by hash. Sockets take the slots in the order they bind; when one
/// closes, the kernel moves the last into its slot; while the group has no
/// socket in `slot`, connections are spread by hash again. The program
/// belongs to the group: attaching it again replaces it.
#[cfg(target_os = "linux")]
pub fn steer_to_slot(listener: &std::net::TcpListener, slot: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: slot,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `prog` and the instruction it points to outlive the call,
    // and the length passed is the size of `prog`; the kernel copies both.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reserved_port_cannot_be_bound_or_reached_until_it_is_released() {
        let r = super::reserve().unwrap();
        let p = r.port();
        assert!(std::net::TcpListener::bind(("127.0.0.1", p)).is_err());
        assert!(std::net::TcpStream::connect(("127.0.0.1", p)).is_err());
        // and free_port walks past it
        for _ in 0..100 {
            assert_ne!(super::free_port().unwrap(), p);
        }
        drop(r);
        std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    }

    #[test]
    fn no_port_is_handed_out_from_a_block_another_process_holds() {
        use super::{BLOCK, BLOCKS, LOW, hold, lock_port};
        // What another process holding blocks looks like from here: their
        // first ports bound. Blocks this process holds already fail to bind.
        let others: Vec<(u16, socket2::Socket)> = (0..BLOCKS)
            .filter(|b| b % 3 == 0)
            .filter_map(|b| hold(lock_port(b)).ok().map(|s| (b, s)))
            .collect();
        assert!(others.len() > 40, "{} blocks held", others.len());
        for _ in 0..400 {
            let p = super::free_port().unwrap();
            let b = (p - LOW) / BLOCK;
            assert!(
                !others.iter().any(|(o, _)| *o == b),
                "port {p} handed out from block {b}, held by another process"
            );
            assert!(!super::hold_block_of(lock_port(others[0].0) + 1));
        }
        // This process now holds the block of every port it handed out.
        let p = super::free_port().unwrap();
        assert!(super::hold_block_of(p));
        assert!(hold(lock_port((p - LOW) / BLOCK)).is_err());
    }

    #[test]
    fn a_probed_port_is_refused_to_clients_and_a_listener_makes_the_probe_fail() {
        let addr = super::probe("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(addr.port(), 0);
        assert!(std::net::TcpStream::connect(addr).is_err());
        let l = std::net::TcpListener::bind(addr).unwrap();
        assert!(super::probe(addr).is_err());
        drop(l);
        #[cfg(target_os = "linux")]
        {
            // nor does a port shared by the processes of another cluster
            let shared = super::bind_shared(addr).unwrap();
            assert!(super::probe(addr).is_err());
            drop(shared);
        }
    }

    #[test]
    fn a_free_port_can_be_bound_and_is_below_the_ephemeral_range() {
        let p = super::free_port().unwrap();
        assert!((20_000..32_000).contains(&p), "{p}");
        std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    }

    #[test]
    fn ports_handed_out_but_not_yet_bound_are_never_handed_out_again() {
        // Callers bind later: the bind check cannot see these, only the walk.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1_000 {
            let p = super::free_port().unwrap();
            assert!(seen.insert(p), "port {p} handed out twice");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn shared_port_is_bound_by_two_sockets_and_refused_to_a_plain_bind() {
        let a = super::bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = super::bind_shared(addr).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
        assert!(std::net::TcpListener::bind(addr).is_err());
        drop(a);
        // the second socket keeps serving the port alone
        std::net::TcpStream::connect(addr).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn steered_connections_reach_slot_1_then_its_successor_then_the_hash() {
        use std::io::Write;
        let bind = |a| {
            let l = super::bind_shared(a).unwrap();
            super::steer_to_slot(&l, 1).unwrap();
            l
        };
        let fallback = super::bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = fallback.local_addr().unwrap();
        let (b, c) = (bind(addr), bind(addr));
        let connect = |n: usize| {
            let mut kept = Vec::new();
            for _ in 0..n {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(b"x").unwrap();
                kept.push(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            kept
        };
        let accepted = |l: &std::net::TcpListener| {
            l.set_nonblocking(true).unwrap();
            std::iter::from_fn(|| l.accept().ok()).count()
        };
        let _k = connect(20);
        assert_eq!(
            (accepted(&fallback), accepted(&b), accepted(&c)),
            (0, 20, 0)
        );
        drop(b); // c moves into slot 1
        let _k = connect(10);
        assert_eq!((accepted(&fallback), accepted(&c)), (0, 10));
        drop(c); // no slot 1: by hash, to the one socket left
        let _k = connect(5);
        assert_eq!(accepted(&fallback), 5);
    }
}
