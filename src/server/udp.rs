//! UDP listeners: one blocking receive loop per socket, several `SO_REUSEPORT` sockets per
//! address (one per core), so the hit path is a plain loop with no task, no channel and
//! no allocation: receive, parse the question, look up, copy, patch, send.
//!
//! Misses are handed to the resolver on the tokio runtime, which answers through a
//! clone of the same socket.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::resolve::{ReplyTo, Resolver, Waiter};
use super::{handle, Action};
use crate::metrics::{inc, Hot};

/// How often a blocked receive wakes up to check for shutdown.
const WAKE: Duration = Duration::from_millis(200);
/// Largest query accepted over UDP.
const MAX_QUERY: usize = 4096;

/// Bind a UDP socket for serving: `SO_REUSEPORT` (several receive loops per address),
/// free bind (the address may appear on the interface a moment later), a large receive
/// buffer (forced past `rmem_max` when privileged), v6-only for IPv6.
pub fn bind(addr: SocketAddr, recv_buffer: usize) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
        sock.set_freebind_ipv6(true)?;
    } else {
        sock.set_freebind(true)?;
    }
    set_recv_buffer(&sock, recv_buffer);
    sock.bind(&addr.into())?;
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(WAKE))?;
    Ok(sock)
}

fn set_recv_buffer(sock: &Socket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt::RcvBufForce};
    if setsockopt(sock, RcvBufForce, &bytes).is_err() {
        let _ = sock.set_recv_buffer_size(bytes);
    }
}

/// The receive loop. Returns when `stop` is set (within [`WAKE`]).
pub fn serve(
    socket: Arc<UdpSocket>,
    resolver: Arc<Resolver>,
    hot: Arc<Hot>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; MAX_QUERY];
    let mut out = Vec::with_capacity(4096);
    while !stop.load(Ordering::Relaxed) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "UDP receive failed");
                continue;
            }
        };
        Hot::add(&hot.queries);
        let pkt = &buf[..n];
        match handle(&resolver, pkt, &mut out, false) {
            action @ (Action::Hit | Action::Reply) => {
                if matches!(action, Action::Hit) {
                    Hot::add(&hot.hits);
                }
                if socket.send_to(&out, peer).is_err() {
                    inc(&resolver.metrics.send_errors);
                }
            }
            Action::Miss(key) => resolver.miss(
                key,
                Waiter {
                    reply: ReplyTo::Udp {
                        socket: Arc::clone(&socket),
                        peer,
                    },
                    packet: pkt.to_vec(),
                },
            ),
            Action::Drop => {}
        }
    }
}
