//! Who may hold one of the HTTP endpoint's connections: the policy that keeps `/metrics`,
//! `/health` and `/ready` answering while someone opens connections and sends nothing.
//!
//! An idle connection has not sent its request line yet, so the path cannot decide who
//! gets a slot; the client address can. Three bounds together:
//! - a connection that has not sent a whole request head within `metrics.header_timeout`
//!   is closed (hyper's header read timeout, which also runs between keep-alive requests),
//!   so a slot held for nothing comes back within seconds;
//! - one client address holds at most [`PER_CLIENT`] connections, so one pod or one host
//!   cannot take the [`GENERAL`] pool alone;
//! - the node itself (a connection whose source address is the address it connected to:
//!   `localdns status`, curl and probes on the node, over loopback or the node's own IP)
//!   may also take the [`RESERVE`], which no other client can, so local probes are served
//!   even while remote clients hold every general slot. The kernel refuses a packet from
//!   outside that claims a local source address (`fib_validate_source`), and a TCP
//!   handshake needs the answers back, so the test cannot be spoofed from a pod.
//!
//! [`admit`] is the decision over counts, unit-tested; [`Slots`] keeps the counts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Connections any client may hold, all clients together.
pub const GENERAL: usize = 64;
/// Connections one client address (not the node itself) may hold at once.
pub const PER_CLIENT: usize = 8;
/// Connections only the node itself may hold, once the general pool is full.
pub const RESERVE: usize = 8;

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot it may use is held.
    Full,
    /// Its client address holds [`PER_CLIENT`] already.
    PerClient,
}

/// The pool a connection's slot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    General,
    Reserve,
}

/// The bounds [`admit`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub general: usize,
    pub per_client: usize,
    pub reserve: usize,
}

pub const LIMITS: Limits = Limits {
    general: GENERAL,
    per_client: PER_CLIENT,
    reserve: RESERVE,
};

/// Open connections now: `general` and `reserve` held, `from_client` of them from the
/// client asking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Open {
    pub general: usize,
    pub reserve: usize,
    pub from_client: usize,
}

/// May one more connection open from a client (`local`: the node itself), and from which
/// pool? The node itself has no per-client bound (it is one address for every local
/// tool) and falls back on the reserve; everyone else is bounded per address.
pub fn admit(limits: &Limits, open: Open, local: bool) -> Result<Pool, Refusal> {
    if !local && open.from_client >= limits.per_client {
        Err(Refusal::PerClient)
    } else if open.general < limits.general {
        Ok(Pool::General)
    } else if local && open.reserve < limits.reserve {
        Ok(Pool::Reserve)
    } else {
        Err(Refusal::Full)
    }
}

/// Is a connection from `peer` to `local` the node talking to itself? (IPv4-mapped IPv6
/// addresses are read as IPv4.)
pub fn is_local(peer: IpAddr, local: IpAddr) -> bool {
    peer.to_canonical() == local.to_canonical()
}

#[derive(Default)]
struct Counts {
    general: usize,
    reserve: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// The endpoint's connection counts, shared by all its listeners.
pub struct Slots {
    limits: Limits,
    counts: Mutex<Counts>,
}

/// One held connection; its slot is given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    client: IpAddr,
    pool: Pool,
}

impl Slots {
    pub fn new(limits: Limits) -> Arc<Slots> {
        Arc::new(Slots {
            limits,
            counts: Mutex::default(),
        })
    }

    /// A slot for a connection from `peer` that arrived on `local`.
    pub fn open(self: &Arc<Self>, peer: IpAddr, local: IpAddr) -> Result<Slot, Refusal> {
        let client = peer.to_canonical();
        let mut c = self.counts.lock();
        let open = Open {
            general: c.general,
            reserve: c.reserve,
            from_client: c.per_client.get(&client).copied().unwrap_or(0),
        };
        let pool = admit(&self.limits, open, is_local(peer, local))?;
        match pool {
            Pool::General => c.general += 1,
            Pool::Reserve => c.reserve += 1,
        }
        *c.per_client.entry(client).or_insert(0) += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            client,
            pool,
        })
    }

    /// Connections held now: (general, reserve).
    pub fn held(&self) -> (usize, usize) {
        let c = self.counts.lock();
        (c.general, c.reserve)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.counts.lock();
        match self.pool {
            Pool::General => c.general -= 1,
            Pool::Reserve => c.reserve -= 1,
        }
        if let Some(n) = c.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        general: 4,
        per_client: 2,
        reserve: 1,
    };

    fn open(general: usize, reserve: usize, from_client: usize) -> Open {
        Open {
            general,
            reserve,
            from_client,
        }
    }

    #[test]
    fn a_remote_client_is_bounded_per_address_and_never_takes_the_reserve() {
        assert_eq!(admit(&L, open(0, 0, 0), false), Ok(Pool::General));
        assert_eq!(admit(&L, open(1, 0, 1), false), Ok(Pool::General));
        assert_eq!(admit(&L, open(2, 0, 2), false), Err(Refusal::PerClient));
        assert_eq!(admit(&L, open(4, 0, 0), false), Err(Refusal::Full));
        // The per-client bound is named first: it is what that client can change.
        assert_eq!(admit(&L, open(4, 0, 2), false), Err(Refusal::PerClient));
    }

    #[test]
    fn the_node_itself_falls_back_on_the_reserve() {
        assert_eq!(admit(&L, open(0, 0, 9), true), Ok(Pool::General));
        assert_eq!(admit(&L, open(4, 0, 9), true), Ok(Pool::Reserve));
        assert_eq!(admit(&L, open(4, 1, 9), true), Err(Refusal::Full));
    }

    #[test]
    fn local_means_the_source_is_the_address_connected_to() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_local(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(is_local(ip("10.0.0.5"), ip("10.0.0.5")));
        assert!(is_local(ip("::ffff:10.0.0.5"), ip("10.0.0.5")));
        assert!(!is_local(ip("127.0.0.2"), ip("127.0.0.1")));
        assert!(!is_local(ip("10.244.0.7"), ip("10.0.0.5")));
    }

    #[test]
    fn slots_count_and_give_back() {
        let s = Slots::new(L);
        let (a, b, me) = (
            "10.244.0.7".parse().unwrap(),
            "10.244.0.8".parse().unwrap(),
            "10.0.0.5".parse().unwrap(),
        );
        let a1 = s.open(a, me).unwrap();
        let _a2 = s.open(a, me).unwrap();
        assert_eq!(s.open(a, me).err(), Some(Refusal::PerClient));
        let _b1 = s.open(b, me).unwrap();
        let _b2 = s.open(b, me).unwrap();
        assert_eq!(s.held(), (4, 0));
        let local = s.open(me, me).unwrap();
        assert_eq!(s.held(), (4, 1));
        assert_eq!(s.open(me, me).err(), Some(Refusal::Full));
        drop(local);
        drop(a1);
        assert_eq!(s.held(), (3, 0));
        assert!(s.open(a, me).is_ok());
    }
}
