//! Clients held back by their miss budget (`upstream.max_in_flight_per_client`): counted per
//! address, named in one log line per client per [`LOG_INTERVAL`] (a storm of thousands of
//! queries a second writes one line, not thousands), and listed in `/status` and
//! `localdns status` while they are recent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One line per held-back client at most this often.
pub const LOG_INTERVAL: Duration = Duration::from_secs(30);
/// Clients remembered at most; beyond it the one seen longest ago is forgotten.
const REMEMBERED: usize = 256;
/// A client is reported while it was held back within this long.
const RECENT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Record {
    total: u64,
    /// Held back since the last line.
    unlogged: u64,
    logged: Option<Instant>,
    last: Instant,
}

/// What `/status` shows of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub client: IpAddr,
    /// Queries held back since it was first seen (or remembered).
    pub total: u64,
    /// Seconds since the last one.
    pub last_secs: u64,
}

#[derive(Debug, Default)]
pub struct Noisy {
    clients: Mutex<HashMap<IpAddr, Record>>,
}

/// Should a line be written now for a client last logged at `logged`?
fn log_due(logged: Option<Instant>, now: Instant) -> bool {
    logged.map_or(true, |at| now.saturating_duration_since(at) >= LOG_INTERVAL)
}

impl Noisy {
    /// `client` was over its budget of `budget` misses waiting: one of its queries was
    /// answered at once (stale or SERVFAIL).
    pub fn held_back(&self, client: IpAddr, budget: usize) {
        let now = Instant::now();
        let mut clients = self.clients.lock();
        if clients.len() >= REMEMBERED && !clients.contains_key(&client) {
            if let Some(oldest) = clients.iter().min_by_key(|(_, r)| r.last).map(|(a, _)| *a) {
                clients.remove(&oldest);
            }
        }
        let r = clients.entry(client).or_insert(Record {
            total: 0,
            unlogged: 0,
            logged: None,
            last: now,
        });
        r.total += 1;
        r.unlogged += 1;
        r.last = now;
        if log_due(r.logged, now) {
            let (held, total) = (r.unlogged, r.total);
            r.logged = Some(now);
            r.unlogged = 0;
            drop(clients);
            tracing::warn!(%client, held, total, budget,
                "client {client} is over its budget of {budget} misses waiting: {held} of its queries answered at once (stale or SERVFAIL) since the last line ({total} in all); other clients are not affected");
        }
    }

    /// The clients held back within the last few minutes, most held back first.
    pub fn recent(&self) -> Vec<Held> {
        let now = Instant::now();
        let mut out: Vec<Held> = self
            .clients
            .lock()
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.last) < RECENT)
            .map(|(&client, r)| Held {
                client,
                total: r.total,
                last_secs: now.saturating_duration_since(r.last).as_secs(),
            })
            .collect();
        out.sort_by(|a, b| b.total.cmp(&a.total).then(a.client.cmp(&b.client)));
        out.truncate(20);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval() {
        let t = Instant::now();
        assert!(log_due(None, t));
        assert!(!log_due(Some(t), t + Duration::from_secs(29)));
        assert!(log_due(Some(t), t + LOG_INTERVAL));
    }

    #[test]
    fn held_back_clients_are_counted_and_listed_most_first() {
        let n = Noisy::default();
        let a: IpAddr = "10.244.0.2".parse().unwrap();
        let b: IpAddr = "fd00::5".parse().unwrap();
        for _ in 0..5 {
            n.held_back(a, 250);
        }
        n.held_back(b, 250);
        let r = n.recent();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].client, r[0].total), (a, 5));
        assert_eq!((r[1].client, r[1].total), (b, 1));
    }

    #[test]
    fn memory_is_bounded() {
        let n = Noisy::default();
        for i in 0..(REMEMBERED as u32 + 50) {
            n.held_back(IpAddr::from(i.to_be_bytes()), 1);
        }
        assert_eq!(n.clients.lock().len(), REMEMBERED);
    }
}
