//! The optional query log (`[log] queries`): one line per answer, or per failed answer,
//! so that an operator sees which names fail, for whom, how slowly and from where, without
//! a packet capture. Each line names the client, the time from receipt to answer, and who
//! answered (the upstream server, `cache`, `stale` or `localdns`).
//!
//! Rate limited twice ([`Budget`]): at most [`LINES_PER_SECOND`] lines a second in all,
//! and at most [`LINES_PER_CLIENT`] of them for one client address, so one noisy pod
//! cannot fill the budget and hide everyone else. The lines left out are counted per
//! client and reported in one line when a later second logs again. Off, it costs the hit
//! path one relaxed load: the name, the client and the clock are read only for a line
//! that is wanted.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::QueryLog as Mode;
use crate::metrics::stats::RCODES;

/// Lines written per second at most.
pub const LINES_PER_SECOND: u64 = 50;
/// Lines written per second at most for one client address.
pub const LINES_PER_CLIENT: u32 = 10;
/// Client addresses counted one by one within a second; more are counted together as
/// "other clients" (the map stays small whatever a storm's sources).
pub const CLIENTS_TRACKED: usize = 1024;
/// Clients named in the line that reports what was left out (the noisiest first).
const CLIENTS_REPORTED: usize = 5;

/// Who made the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// A fresh cached answer.
    Cache,
    /// An expired cached answer (serve-stale).
    Stale,
    /// localdns itself (SERVFAIL when no upstream answered).
    Localdns,
    /// An upstream answer passed on: the server when known.
    Upstream(Option<SocketAddr>),
}

impl std::fmt::Display for By {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            By::Cache => f.write_str("cache"),
            By::Stale => f.write_str("stale"),
            By::Localdns => f.write_str("localdns"),
            By::Upstream(Some(server)) => write!(f, "{server}"),
            By::Upstream(None) => f.write_str("upstream"),
        }
    }
}

/// Who asked and when: read only for a line that is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    pub proto: &'static str,
    /// The client's address and port, when the caller knows it.
    pub client: Option<SocketAddr>,
    /// When the query was received.
    pub received: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct QueryLog {
    mode: AtomicU8,
    budget: Mutex<Budget>,
}

/// Does `mode` log an answer with `rcode`? `errors` is everything but NOERROR and
/// NXDOMAIN (a name that does not exist is an answer, not a failure).
pub fn wanted(mode: u8, rcode: u8) -> bool {
    match mode {
        0 => false,
        1 => rcode != 0 && rcode != 3,
        _ => true,
    }
}

/// Lines of one client within the current second.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    written: u32,
    left_out: u64,
}

/// The rate limit as data: which line is written, and what was left out, per second.
/// `None` as a client is one whose address is not known, or past [`CLIENTS_TRACKED`].
#[derive(Debug, Default)]
pub struct Budget {
    second: u64,
    written: u64,
    clients: HashMap<Option<IpAddr>, Tally>,
}

/// What one second left out: the total, and the noisiest clients with their count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    pub lines: u64,
    pub clients: usize,
    pub noisiest: Vec<(Option<IpAddr>, u64)>,
}

impl Budget {
    /// Whether a line for `client` at second `now` is written; when `now` starts a new
    /// second, also what the previous one left out (if anything).
    pub fn admit(&mut self, now: u64, client: Option<IpAddr>) -> (bool, Option<LeftOut>) {
        let mut report = None;
        if now != self.second {
            report = self.left_out();
            self.second = now;
            self.written = 0;
            self.clients.clear();
        }
        let key = match client {
            Some(_)
                if self.clients.len() >= CLIENTS_TRACKED && !self.clients.contains_key(&client) =>
            {
                None
            }
            c => c,
        };
        let tally = self.clients.entry(key).or_default();
        let ok = self.written < LINES_PER_SECOND && tally.written < LINES_PER_CLIENT;
        if ok {
            tally.written += 1;
            self.written += 1;
        } else {
            tally.left_out += 1;
        }
        (ok, report)
    }

    fn left_out(&self) -> Option<LeftOut> {
        let mut noisiest: Vec<_> = self
            .clients
            .iter()
            .filter(|(_, t)| t.left_out > 0)
            .map(|(c, t)| (*c, t.left_out))
            .collect();
        if noisiest.is_empty() {
            return None;
        }
        let lines = noisiest.iter().map(|(_, n)| n).sum();
        let clients = noisiest.len();
        noisiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        noisiest.truncate(CLIENTS_REPORTED);
        Some(LeftOut {
            lines,
            clients,
            noisiest,
        })
    }
}

/// A client for a log line: its address, or "-" when unknown.
fn client_text(c: Option<IpAddr>) -> String {
    c.map_or_else(|| "-".into(), |ip| ip.to_string())
}

impl LeftOut {
    /// The report line's text after "query log: ".
    pub fn text(&self) -> String {
        let who: Vec<String> = self
            .noisiest
            .iter()
            .map(|(c, n)| format!("{} {n}", client_text(*c)))
            .collect();
        format!(
            "{} lines left out (over {LINES_PER_SECOND} a second, or {LINES_PER_CLIENT} per client) from {} clients: {}",
            self.lines,
            self.clients,
            who.join(", ")
        )
    }
}

impl QueryLog {
    pub fn set(&self, mode: Mode) {
        self.mode.store(
            match mode {
                Mode::Off => 0,
                Mode::Errors => 1,
                Mode::All => 2,
            },
            Relaxed,
        );
    }

    /// Log one answer if the mode wants it and the rate allows. `msg` is the answer;
    /// `name` and `asked` are called only for a line that may be written.
    #[inline]
    pub fn answer(
        &self,
        name: impl FnOnce() -> String,
        qtype: u16,
        msg: &[u8],
        by: By,
        asked: impl FnOnce() -> Asked,
    ) {
        let mode = self.mode.load(Relaxed);
        if mode == 0 {
            return;
        }
        let rcode = msg.get(3).map_or(2, |b| b & 0x0f);
        if wanted(mode, rcode) {
            let asked = asked();
            let latency = asked.received.map(|t| t.elapsed());
            self.write(name, qtype, rcode, by, asked, latency);
        }
    }

    #[cold]
    fn write(
        &self,
        name: impl FnOnce() -> String,
        qtype: u16,
        rcode: u8,
        by: By,
        asked: Asked,
        latency: Option<Duration>,
    ) {
        let client = asked.client.map(|c| c.ip());
        let (ok, report) = self.budget.lock().admit(crate::metrics::unix_now(), client);
        if let Some(r) = report {
            tracing::info!(target: "localdns::query", left_out = r.lines, clients = r.clients,
                "query log: {}", r.text());
        }
        if !ok {
            return;
        }
        let name = name();
        let rcode = RCODES[usize::from(rcode)];
        let qtype = crate::metrics::stats::type_name(crate::metrics::stats::type_index(qtype));
        let proto = asked.proto;
        let client = asked
            .client
            .map_or_else(|| "-".to_string(), |c| c.to_string());
        let latency_us = latency.map_or(0, |d| d.as_micros() as u64);
        let took = latency.map_or_else(
            || "-".to_string(),
            |d| format!("{:.3} ms", d.as_secs_f64() * 1e3),
        );
        tracing::info!(target: "localdns::query", name = %name, qtype, rcode, by = %by, proto,
            client = %client, latency_us,
            "query {name} {qtype} ({proto}) from {client}: {rcode} by {by} in {took}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert!(!wanted(0, 2));
        assert!(wanted(1, 2) && wanted(1, 5) && !wanted(1, 0) && !wanted(1, 3));
        assert!(wanted(2, 0) && wanted(2, 3));
    }

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 244, 0, n]))
    }

    #[test]
    fn one_noisy_client_cannot_hide_the_others() {
        let mut b = Budget::default();
        // Second 1: client 1 asks 200 times, then clients 2..=5 once each.
        let written = (0..200).filter(|_| b.admit(1, ip(1)).0).count();
        assert_eq!(written, LINES_PER_CLIENT as usize);
        for n in 2..=5 {
            assert_eq!(b.admit(1, ip(n)), (true, None), "client {n}");
        }
        // The next second reports what the first left out, by client.
        let (ok, report) = b.admit(2, ip(2));
        assert!(ok);
        let r = report.expect("a report");
        assert_eq!((r.lines, r.clients), (190, 1));
        assert_eq!(r.noisiest, vec![(ip(1), 190)]);
        assert!(r.text().starts_with("190 lines left out"), "{}", r.text());
        assert!(r.text().contains("10.244.0.1 190"), "{}", r.text());
        // Nothing left out: no report.
        assert_eq!(b.admit(3, ip(2)).1, None);
    }

    #[test]
    fn the_total_is_bounded_whatever_the_number_of_clients() {
        let mut b = Budget::default();
        let written = (0..2000u32)
            .filter(|i| b.admit(7, Some(IpAddr::from((*i).to_be_bytes()))).0)
            .count();
        assert_eq!(written as u64, LINES_PER_SECOND);
        assert!(b.clients.len() <= CLIENTS_TRACKED + 1);
        let r = b.admit(8, None).1.unwrap();
        assert_eq!(r.lines, 2000 - LINES_PER_SECOND);
        assert_eq!(r.noisiest.len(), CLIENTS_REPORTED);
        // Clients past CLIENTS_TRACKED are counted together, as unknown.
        assert_eq!(r.noisiest[0].0, None);
    }

    #[test]
    fn lines_name_who_answered() {
        assert_eq!(By::Cache.to_string(), "cache");
        assert_eq!(By::Stale.to_string(), "stale");
        assert_eq!(By::Localdns.to_string(), "localdns");
        assert_eq!(By::Upstream(None).to_string(), "upstream");
        let server: SocketAddr = ([192, 0, 2, 53], 53).into();
        assert_eq!(By::Upstream(Some(server)).to_string(), "192.0.2.53:53");
    }

    #[test]
    fn off_reads_nothing() {
        let q = QueryLog::default();
        let servfail = [0, 0, 0x81, 0x82, 0, 0, 0, 0, 0, 0, 0, 0];
        q.answer(
            || panic!("name read with the log off"),
            1,
            &servfail,
            By::Localdns,
            || panic!("client read with the log off"),
        );
        q.set(Mode::Errors);
        let noerror = [0u8; 12];
        q.answer(
            || panic!("name read"),
            1,
            &noerror,
            By::Cache,
            || panic!("asked read"),
        );
    }
}
