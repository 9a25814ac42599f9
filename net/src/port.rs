//! Loopback ports for processes we start.

use std::net::TcpListener;
use std::time::{SystemTime, UNIX_EPOCH};

/// A loopback port that was free a moment ago, for a process started next to
/// listen on. Taken below Linux's default ephemeral range (32768 and up), from
/// which outgoing connections draw their source ports: a port handed out by
/// the kernel (`bind :0`) can be taken by a connection before the node binds it
/// (seen as "Address already in use" at start under test load).
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // One start per process, different between processes picking at the same
    // time. Fixed within a process so that the walk below (a stride coprime
    // with SPAN) never hands out the same port twice: a port handed out but
    // not bound yet passes the bind check, and a start drawn anew per call let
    // two threads of one test binary get the same port (a node then failed to
    // start with exit status 1).
    static SEED: OnceLock<u32> = OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        std::process::id().wrapping_mul(2_654_435_761)
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
    });
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (seed % SPAN + (n % SPAN) * 7_919) % SPAN;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            drop(l);
            return Ok(port as u16);
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
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
    use socket2::{Domain, Socket, Type};
    let mut last = None;
    for _ in 0..16 {
        let port = free_port()?;
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        match socket.bind(&addr.into()) {
            Ok(()) => {
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
    fn a_free_port_can_be_bound_and_is_below_the_ephemeral_range() {
        let p = super::free_port().unwrap();
        assert!((20_000..32_000).contains(&p), "{p}");
        std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    }

    #[test]
    fn ports_handed_out_but_not_yet_bound_are_never_handed_out_again() {
        // Callers bind later: the bind check cannot see these, only the walk.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3_000 {
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
