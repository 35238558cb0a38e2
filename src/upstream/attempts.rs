//! The attempt schedule of one upstream query: which server and transport each attempt
//! uses, when the next one starts, and what an answer's RCODE means for the query. Pure
//! decisions over a clock in microseconds; [`super::Pool::query`] does the I/O.
//!
//! Attempts overlap instead of replacing each other. The first goes out at once; the next
//! starts when the previous one failed outright (an error, SERVFAIL or REFUSED), or when it
//! has gone unanswered for the server's retransmission timeout: the smoothed round-trip
//! time plus four deviations (RFC 6298's estimator, as unbound's infra cache keeps per
//! server), never less than [`RTO_MIN`] and never more than the pool's `timeout`, doubling
//! for each attempt already sent. An attempt that was overtaken is not abandoned: its
//! answer is still taken if it comes first, until the query's deadline (`timeout ×
//! attempts`, the same bound as before). So one slow name costs no more than before, while
//! an upstream that drops a share of its queries (a rate-limiting VPC resolver) is asked
//! again after tens of milliseconds, not after a whole second: in-flight counts, and with
//! them the budgets of [`crate::server::resolve`], stay small under loss.
//!
//! The second round over the pool's servers goes over TCP when the pool speaks UDP: a
//! resolver that drops UDP when over its rate (NSD's and BIND's RRL, cloud resolvers' per
//! interface limits) answers TCP, which is never rate limited that way.

use std::time::Duration;

/// The floor of the retransmission timeout (unbound's `infra-cache-min-rtt` is the same).
pub const RTO_MIN: Duration = Duration::from_millis(50);

/// RFC 6298 round-trip estimator of one server, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rtt {
    /// Smoothed round-trip time; 0 = no sample yet.
    srtt: u64,
    /// Round-trip time variation.
    rttvar: u64,
}

impl Rtt {
    /// Take one measured round trip (an answer, whatever its RCODE).
    pub fn sample(&mut self, rtt: Duration) {
        let r = rtt.as_micros().min(u128::from(u32::MAX)) as u64;
        if self.srtt == 0 {
            self.srtt = r.max(1);
            self.rttvar = r / 2;
        } else {
            // rttvar = 3/4 rttvar + 1/4 |srtt - r|; srtt = 7/8 srtt + 1/8 r
            self.rttvar = (3 * self.rttvar + self.srtt.abs_diff(r)) / 4;
            self.srtt = ((7 * self.srtt + r) / 8).max(1);
        }
    }

    /// How long an attempt may go unanswered before the next one starts: srtt + 4 rttvar,
    /// within [`RTO_MIN`] and `timeout`; `timeout` itself until the first sample.
    pub fn rto(&self, timeout: Duration) -> Duration {
        if self.srtt == 0 {
            return timeout;
        }
        let rto = Duration::from_micros(self.srtt.saturating_add(self.rttvar.saturating_mul(4)));
        rto.clamp(RTO_MIN.min(timeout), timeout)
    }

    pub fn srtt(&self) -> Duration {
        Duration::from_micros(self.srtt)
    }
}

/// The transport of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Udp,
    Tcp,
}

/// Attempt `n` (from 0) over `servers` candidates: the index into them and the transport.
/// Servers are taken in order and cycled; in a UDP pool every second round goes over TCP.
pub fn plan(n: usize, servers: usize, pool_tcp: bool) -> (usize, Via) {
    let servers = servers.max(1);
    let round = n / servers;
    let via = if pool_tcp || round % 2 == 1 {
        Via::Tcp
    } else {
        Via::Udp
    };
    (n % servers, via)
}

/// When attempt `n` (n ≥ 1) starts, counted from the start of attempt `n - 1`, if that one
/// is still unanswered: the server's timeout doubled for each attempt already sent beyond
/// the first (exponential back-off), capped at `timeout`.
pub fn next_after(n: usize, rto: Duration, timeout: Duration) -> Duration {
    let doublings = n.saturating_sub(1).min(16) as u32;
    rto.saturating_mul(1 << doublings).min(timeout)
}

/// What an upstream answer's RCODE means for the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A usable answer (NOERROR, NXDOMAIN, or anything not below): done, server healthy.
    Final,
    /// SERVFAIL or REFUSED: the server could not or would not answer. Ask the next server
    /// (CoreDNS `forward` and glibc's stub move on too); it is kept as the answer only if
    /// no server does better. It never marks a server healthy, and counts against it.
    TryNext,
}

pub fn verdict(rcode: u8) -> Verdict {
    const SERVFAIL: u8 = 2;
    const REFUSED: u8 = 5;
    match rcode {
        SERVFAIL | REFUSED => Verdict::TryNext,
        _ => Verdict::Final,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn rto_is_the_timeout_until_measured_then_follows_the_round_trip() {
        let mut r = Rtt::default();
        assert_eq!(r.rto(SEC), SEC);
        r.sample(Duration::from_micros(200));
        // Loopback-fast: floored.
        assert_eq!(r.rto(SEC), RTO_MIN);
        let mut far = Rtt::default();
        for _ in 0..20 {
            far.sample(Duration::from_millis(500));
        }
        let rto = far.rto(SEC);
        assert!(
            rto >= Duration::from_millis(500) && rto < Duration::from_millis(560),
            "{rto:?}"
        );
        // Never above the configured timeout.
        far.sample(Duration::from_secs(30));
        assert_eq!(far.rto(SEC), SEC);
        // A timeout smaller than the floor wins.
        assert_eq!(
            Rtt {
                srtt: 10,
                rttvar: 0
            }
            .rto(Duration::from_millis(20)),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn variance_widens_the_rto() {
        let mut steady = Rtt::default();
        let mut jumpy = Rtt::default();
        for i in 0..50 {
            steady.sample(Duration::from_millis(100));
            jumpy.sample(Duration::from_millis(if i % 2 == 0 { 20 } else { 180 }));
        }
        assert!(jumpy.rto(SEC) > steady.rto(SEC) + Duration::from_millis(100));
        assert!(steady.srtt() >= Duration::from_millis(99));
    }

    #[test]
    fn plan_cycles_servers_and_uses_tcp_every_second_round_of_a_udp_pool() {
        let one: Vec<_> = (0..3).map(|n| plan(n, 1, false)).collect();
        assert_eq!(one, [(0, Via::Udp), (0, Via::Tcp), (0, Via::Udp)]);
        let two: Vec<_> = (0..4).map(|n| plan(n, 2, false)).collect();
        assert_eq!(
            two,
            [(0, Via::Udp), (1, Via::Udp), (0, Via::Tcp), (1, Via::Tcp)]
        );
        assert!((0..5).all(|n| plan(n, 2, true).1 == Via::Tcp));
        assert_eq!(plan(3, 0, false), (0, Via::Tcp), "no servers is one server");
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_timeout() {
        let rto = Duration::from_millis(50);
        assert_eq!(next_after(1, rto, SEC), rto);
        assert_eq!(next_after(2, rto, SEC), rto * 2);
        assert_eq!(next_after(3, rto, SEC), rto * 4);
        assert_eq!(next_after(9, rto, SEC), SEC);
        assert_eq!(next_after(usize::MAX, rto, SEC), SEC);
    }

    #[test]
    fn servfail_and_refused_move_on_everything_else_is_final() {
        assert_eq!(verdict(0), Verdict::Final);
        assert_eq!(verdict(3), Verdict::Final, "NXDOMAIN is an answer");
        assert_eq!(verdict(2), Verdict::TryNext);
        assert_eq!(verdict(5), Verdict::TryNext);
        assert_eq!(
            verdict(4),
            Verdict::Final,
            "NOTIMP is left to the EDNS fallback"
        );
    }
}
