//! UDP listeners: one blocking receive loop per socket, several `SO_REUSEPORT` sockets per
//! address (one per core), so the hit path is a plain loop with no task and no channel:
//! receive a batch, parse each question, look up, copy, patch, send the batch.
//!
//! Chosen by measurement (shared/bench, server pinned to one core, same run): cache hits
//! cost 4.18-4.23 µs of server CPU per query with recvmmsg/sendmmsg batching, 4.24-4.67
//! with a plain recv_from/send_to loop, against 4.40-4.52 for the do-nothing floor and
//! 5.3 for unbound.
//!
//! Misses are handed to the resolver on the tokio runtime, which answers through a
//! clone of the same socket.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Protocol, Socket, Type};

use super::resolve::{ReplyTo, Resolver, Waiter};
use super::{handle_from, Action};
use crate::metrics::{inc, Stats};

/// How often a blocked receive wakes up to check for shutdown.
const WAKE: Duration = Duration::from_millis(200);
/// Largest query accepted over UDP.
const MAX_QUERY: usize = 4096;

/// Receive loops per address when `udp_threads = 0`, at most. Each loop has its own
/// socket whose receive buffer (`udp_recv_buffer`, 4 MiB by default, forced past
/// `rmem_max`) is charged to the unit's memory when it fills, plus a 128 KiB batch
/// buffer: one per CPU on a 192-CPU node with two addresses would be 1.6 GB against
/// `MemoryMax=256M`. Four loops answer several hundred thousand cached queries a second
/// (about 4.2 µs each, bench/), more than the pods of any node ask; more threads are a
/// number to set, not a default.
pub const AUTO_THREADS_MAX: usize = 4;

/// Receive loops per address: `configured`, or for 0 one per CPU up to
/// [`AUTO_THREADS_MAX`].
pub fn thread_count(configured: usize, cpus: usize) -> usize {
    match configured {
        0 => cpus.clamp(1, AUTO_THREADS_MAX),
        n => n,
    }
}

/// Bind a UDP socket for serving: `SO_REUSEPORT` (several receive loops per address),
/// free bind (the address may appear on the interface a moment later), a large receive
/// buffer (forced past `rmem_max` when privileged), v6-only for IPv6.
pub fn bind(addr: SocketAddr, recv_buffer: usize) -> io::Result<UdpSocket> {
    let sock = super::listen_socket(addr, Type::DGRAM, Protocol::UDP)?;
    sock.set_reuse_port(true)?;
    set_recv_buffer(&sock, recv_buffer);
    sock.bind(&addr.into())?;
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(WAKE))?;
    Ok(sock)
}

/// Take over a UDP socket kept by systemd across a restart, after checking it is what
/// `addr` needs. Datagrams queued in it during the restart are answered first thing.
pub fn adopt(
    fd: std::os::fd::OwnedFd,
    addr: SocketAddr,
    recv_buffer: usize,
) -> io::Result<UdpSocket> {
    let sock = Socket::from(fd);
    super::check_kept(&sock, Type::DGRAM, addr)?;
    set_recv_buffer(&sock, recv_buffer);
    sock.set_nonblocking(false)?;
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

/// Datagrams received (and answers sent) per system call.
const BATCH: usize = 32;

/// The receive loop with batching: `recvmmsg` takes every datagram waiting (up to
/// [`BATCH`], blocking only for the first), cache hits are answered together with one
/// `sendmmsg`. Returns when `stop` is set (within [`WAKE`]). `stats` is this loop's own
/// block; misses are counted in `miss_stats` when the miss path answers them.
pub fn serve(
    socket: Arc<UdpSocket>,
    resolver: Arc<Resolver>,
    stats: Arc<Stats>,
    miss_stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;

    let fd = socket.as_raw_fd();
    // Boxed arrays (not Vecs) so that the per-batch I/O vectors below can be plain arrays
    // on the stack: nothing is allocated per batch.
    let mut bufs: Box<[[u8; MAX_QUERY]; BATCH]> = Box::new([[0u8; MAX_QUERY]; BATCH]);
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(4096)).collect();
    let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut got: Vec<(usize, Option<SockaddrStorage>)> = Vec::with_capacity(BATCH);
    let mut replies: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        got.clear();
        let received = {
            let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                bufs.each_mut().map(|b| [IoSliceMut::new(&mut b[..])]);
            recvmmsg(
                fd,
                &mut recv_headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            )
            .map(|results| got.extend(results.map(|r| (r.bytes, r.address))))
        };
        // One clock read per batch: the heartbeat (also after a timeout, so an idle loop
        // is seen alive) and the time every answer of this batch is aged by.
        let now = resolver.cache.now_ms();
        stats.heartbeat.store(now, Ordering::Relaxed);
        let received_at = std::time::Instant::now();
        match received {
            Ok(()) => {}
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "UDP receive failed: {e}");
                continue;
            }
        }
        replies.clear();
        for (i, &(n, addr)) in got.iter().enumerate() {
            let pkt = &bufs[i][..n.min(MAX_QUERY)];
            let out = &mut outs[replies.len()];
            let who = || (addr.and_then(|a| to_socket_addr(&a)), Some(received_at));
            match handle_from(&resolver, pkt, out, false, now, &stats, who) {
                Action::Hit | Action::Reply => replies.push(addr),
                Action::Miss(key) => {
                    let peer = addr.and_then(|a| to_socket_addr(&a));
                    let reply = |peer| ReplyTo::Udp {
                        socket: Arc::clone(&socket),
                        peer,
                    };
                    let waiter = peer.and_then(|peer: SocketAddr| {
                        let stats = Arc::clone(&miss_stats);
                        Waiter::new(reply(peer), peer, pkt, stats, received_at)
                    });
                    if let Some(waiter) = waiter {
                        resolver.miss(key, waiter);
                    }
                }
                Action::Drop => {}
            }
        }
        if replies.is_empty() {
            continue;
        }
        // One clock read per batch: every answer of the batch took this long (counted
        // before the send, so a client that has its answer sees it counted).
        stats.durations(
            received_at.elapsed().as_nanos() as u64,
            replies.len() as u64,
        );
        let slices: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(outs.get(i).map_or(&[][..], |o| &o[..]))]);
        let failed = send_batch(replies.len(), |from| {
            sendmmsg(
                fd,
                &mut send_headers,
                slices[from..replies.len()].iter(),
                &replies[from..],
                [],
                MsgFlags::MSG_DONTWAIT,
            )
            .map(|r| r.count())
        });
        for _ in 0..failed {
            inc(&resolver.metrics.send_errors);
        }
    }
}

/// Send messages `0..n` with `send(from)`, which sends from `from` on and says how many
/// went (`sendmmsg` stops at the first that fails). One failing destination costs only its
/// own answer: sending resumes after it. Returns how many failed. In the usual case (all
/// sent) this is one call.
fn send_batch(n: usize, mut send: impl FnMut(usize) -> nix::Result<usize>) -> usize {
    let (mut from, mut failed) = (0, 0);
    while from < n {
        match send(from) {
            Ok(sent) if sent > 0 => from += sent,
            _ => {
                failed += 1;
                from += 1;
            }
        }
    }
    failed
}

fn to_socket_addr(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

#[cfg(test)]
mod tests {
    use super::{send_batch, thread_count, AUTO_THREADS_MAX};

    /// A stand-in for `sendmmsg` where the destinations in `bad` fail: it sends from
    /// `from` up to the first bad one, and fails when that is the first.
    fn fake(bad: &[usize], sent: &mut Vec<usize>, n: usize, from: usize) -> nix::Result<usize> {
        let stop = (from..n).find(|i| bad.contains(i)).unwrap_or(n);
        if stop == from {
            return Err(nix::errno::Errno::EPERM);
        }
        sent.extend(from..stop);
        Ok(stop - from)
    }

    #[test]
    fn a_failing_destination_does_not_drop_the_rest_of_the_batch() {
        for (n, bad, calls_max) in [
            (4, vec![], 1),
            (4, vec![1], 3),
            (4, vec![0], 2),
            (4, vec![3], 2),
            (5, vec![1, 2], 4),
            (3, vec![0, 1, 2], 3),
        ] {
            let (mut sent, mut calls) = (Vec::new(), 0);
            let failed = send_batch(n, |from| {
                calls += 1;
                fake(&bad, &mut sent, n, from)
            });
            let want: Vec<usize> = (0..n).filter(|i| !bad.contains(i)).collect();
            assert_eq!((sent, failed), (want, bad.len()), "n {n} bad {bad:?}");
            assert!(calls <= calls_max, "n {n} bad {bad:?}: {calls} calls");
        }
    }

    #[test]
    fn automatic_thread_count_is_capped() {
        assert_eq!(thread_count(0, 1), 1);
        assert_eq!(thread_count(0, 2), 2);
        assert_eq!(thread_count(0, 192), AUTO_THREADS_MAX);
        assert_eq!(thread_count(0, 0), 1);
        // A number set is a number kept, past the automatic cap too.
        assert_eq!(thread_count(16, 2), 16);
    }
}
