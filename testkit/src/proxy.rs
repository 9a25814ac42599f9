//! A loopback TCP proxy that a test switches between forwarding, refusing
//! (accept and close at once) and hanging (accept, then never read or
//! answer): a peer link that can be cut, healed or made to stall.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forward = 0,
    Refuse = 1,
    Hang = 2,
}

struct Shared {
    mode: AtomicU8,
    stop: AtomicBool,
    /// Both ends of every forwarded connection, to cut them on a partition.
    live: Mutex<Vec<TcpStream>>,
    /// Connections accepted while hanging, held open and never answered.
    held: Mutex<Vec<TcpStream>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on a free loopback port in front of `upstream`.
    pub fn start(upstream: &str, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let addr = listener.local_addr().unwrap();
        let upstream: SocketAddr = upstream.parse().expect("upstream address");
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(mode as u8),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Acquire) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                match s.mode.load(Ordering::Acquire) {
                    0 => forward(&s, conn, upstream),
                    2 => s.held.lock().unwrap().push(conn),
                    _ => {
                        let _ = conn.shutdown(Shutdown::Both);
                    }
                }
            }
        });
        Proxy {
            addr,
            upstream,
            shared,
            accept: Some(accept),
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn mode(&self) -> Mode {
        match self.shared.mode.load(Ordering::Acquire) {
            0 => Mode::Forward,
            2 => Mode::Hang,
            _ => Mode::Refuse,
        }
    }

    /// Switches mode; leaving `Forward` cuts every forwarded connection,
    /// leaving `Hang` closes the held ones.
    pub fn set(&self, mode: Mode) {
        self.shared.mode.store(mode as u8, Ordering::Release);
        if mode != Mode::Forward {
            for c in self.shared.live.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        if mode != Mode::Hang {
            for c in self.shared.held.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// Connections accepted and held while hanging.
    pub fn held(&self) -> usize {
        self.shared.held.lock().unwrap().len()
    }
}

fn forward(s: &Arc<Shared>, client: TcpStream, upstream: SocketAddr) {
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(1)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    {
        let mut live = s.live.lock().unwrap();
        // Forget connections that are already gone (best effort).
        live.retain(|c| c.peer_addr().is_ok());
        live.push(c2);
        live.push(s2);
    }
    pipe(client.try_clone().ok(), server.try_clone().ok());
    pipe(server.try_clone().ok(), client.try_clone().ok());
}

fn pipe(from: Option<TcpStream>, to: Option<TcpStream>) {
    let (Some(mut from), Some(mut to)) = (from, to) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.set(Mode::Refuse);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = self.upstream;
    }
}
