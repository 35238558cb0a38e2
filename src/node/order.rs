//! Where localdns's jumps sit in the built-in chains, and the brake on moving them back.
//!
//! In iptables (nft or legacy) a built-in chain is one list: the first rule whose target
//! ends the traversal decides. localdns inserts its jump at position 1, but another agent
//! (a CNI, a hardening tool, a hand-typed `iptables -t raw -I PREROUTING 1 ... -j ACCEPT`)
//! can insert its own rule ahead later. A raw ACCEPT ahead means DNS to our addresses is
//! never NOTRACKed: conntrack and kube-proxy's DNAT take it to kube-dns, the very path
//! localdns exists to remove, while every rule of localdns's is still there word for word.
//! So the drift check also asks, per hook, whether a foreign rule ahead of our jump could
//! change what happens to DNS to (or, on OUTPUT, from) our addresses, and if so the jump
//! is moved back to the top.
//!
//! "Could change" is decided conservatively, from the save output alone: a rule ahead
//! counts unless its matches rule our DNS out (`-p`, `-s`, `-d`, `--dport`, `--sport`,
//! multiport lists; anything negated or not understood may match) or its target leaves
//! the packet to continue (no target, LOG, MARK, NOTRACK, ...). A jump to another chain of
//! the table counts when a rule in that chain would (RETURN there only returns); a goto
//! always counts. In the filter table an ACCEPT ahead does what ours does, so only a
//! DROP, REJECT, RETURN (the policy) or a jump to a chain with one counts there.
//!
//! The brake ([`Brake`]): an agent that keeps putting its rule first (Calico's insert
//! mode does, on every refresh) would make a plain check-and-move loop fight it forever,
//! each side rewriting the table on the other's event. After [`THRESHOLD`] moves within
//! a window, further moves wait, twice as long each time up to a cap; the node is
//! reported not ready meanwhile (its DNS is bypassed), and the back-off is forgotten once
//! no move was needed for a whole window.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::rules::{Family, Hook};

/// One kind of packet localdns's rules in a hook are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub proto: &'static str,
    /// A query to `ip:port` (`true`), or an answer from it.
    pub query: bool,
    pub ip: IpAddr,
    pub port: u16,
}

/// The packets `hook` handles for the addresses of `family` (as [`super::rules::chain_rules`]
/// writes them): queries on PREROUTING and INPUT, answers on filter OUTPUT, both on raw
/// OUTPUT (queries from the node itself).
pub fn flows(hook: &Hook, family: Family, addresses: &[IpAddr], port: u16) -> Vec<Flow> {
    let (query, reply) = match (hook.table, hook.builtin) {
        ("raw", "OUTPUT") => (true, true),
        ("filter", "OUTPUT") => (false, true),
        _ => (true, false),
    };
    let mut out = Vec::new();
    for &ip in addresses.iter().filter(|ip| Family::of(ip) == family) {
        for proto in ["udp", "tcp"] {
            for (wanted, q) in [(query, true), (reply, false)] {
                if wanted {
                    out.push(Flow {
                        proto,
                        query: q,
                        ip,
                        port,
                    });
                }
            }
        }
    }
    out
}

/// Splits a save line into words, as iptables-save quotes them (`"..."` with `\"`).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return out;
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => word.extend(chars.next()),
                    '"' => break,
                    c => word.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        out.push(word);
    }
}

/// What a rule says that matters here; `None` fields were not given (or were negated,
/// which is read as "may match").
#[derive(Debug, Default, PartialEq, Eq)]
struct Rule {
    chain: String,
    proto: Option<String>,
    source: Option<String>,
    destination: Option<String>,
    dport: Option<String>,
    sport: Option<String>,
    /// multiport `--ports`: either side.
    ports: Option<String>,
    jump: Option<String>,
    goto: Option<String>,
}

fn rule(line: &str) -> Option<Rule> {
    let w = words(line.strip_prefix("-A ")?);
    let mut r = Rule {
        chain: w.first()?.clone(),
        ..Rule::default()
    };
    let mut i = 1;
    let mut negated = false;
    while i < w.len() {
        let key = w[i].as_str();
        if key == "!" {
            negated = true;
            i += 1;
            continue;
        }
        let value = w.get(i + 1).cloned();
        let slot = match key {
            "-p" | "--protocol" => Some(&mut r.proto),
            "-s" | "--source" => Some(&mut r.source),
            "-d" | "--destination" => Some(&mut r.destination),
            "--dport" | "--destination-port" | "--dports" | "--destination-ports" => {
                Some(&mut r.dport)
            }
            "--sport" | "--source-port" | "--sports" | "--source-ports" => Some(&mut r.sport),
            "--ports" => Some(&mut r.ports),
            "-j" | "--jump" => {
                r.jump = value.clone();
                None
            }
            "-g" | "--goto" => {
                r.goto = value.clone();
                None
            }
            _ => None,
        };
        if let Some(slot) = slot {
            if !negated {
                *slot = value;
            }
        }
        // `! -p udp`, `-m udp ! --dport 53`: the `!` belongs to the next option only.
        negated = false;
        i += if key.starts_with('-') { 2 } else { 1 };
    }
    Some(r)
}

/// Whether `net` (`ADDR`, `ADDR/LEN` or `ADDR/MASK`) holds `ip`; `true` when it cannot
/// be read.
fn holds(net: &str, ip: IpAddr) -> bool {
    let (addr, mask) = net.split_once('/').unwrap_or((net, ""));
    let bits = |a: IpAddr| -> u128 {
        match a {
            IpAddr::V4(v) => u128::from(u32::from(v)),
            IpAddr::V6(v) => u128::from(v),
        }
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return true;
    };
    if addr.is_ipv4() != ip.is_ipv4() {
        return true;
    }
    let width: u32 = if ip.is_ipv4() { 32 } else { 128 };
    let mask = if mask.is_empty() {
        u128::MAX
    } else if let Ok(len) = mask.parse::<u32>() {
        match len.min(width) {
            0 => 0,
            len => u128::MAX << (128 - len),
        }
    } else if let Ok(m) = mask.parse::<IpAddr>() {
        bits(m) << (128 - width)
    } else {
        return true;
    };
    let shift = |a: IpAddr| bits(a) << (128 - width);
    shift(addr) & mask == shift(ip) & mask
}

/// Whether a port list (`53`, `1:1024`, `53,80,1000:2000`) holds `port`; `true` when it
/// cannot be read.
fn has_port(list: &str, port: u16) -> bool {
    list.split(',').any(|item| {
        let (lo, hi) = item.split_once(':').unwrap_or((item, item));
        let lo = if lo.is_empty() {
            Ok(0)
        } else {
            lo.parse::<u16>()
        };
        let hi = if hi.is_empty() {
            Ok(u16::MAX)
        } else {
            hi.parse::<u16>()
        };
        match (lo, hi) {
            (Ok(lo), Ok(hi)) => (lo..=hi).contains(&port),
            _ => true,
        }
    })
}

fn proto_is(given: &str, proto: &str) -> bool {
    let number = match proto {
        "tcp" => "6",
        _ => "17",
    };
    matches!(given, "all" | "0") || given.eq_ignore_ascii_case(proto) || given == number
}

/// Whether `r` may match `f` (only what rules it out for certain says no).
fn may_match(r: &Rule, f: &Flow) -> bool {
    // `known`: the flow fixes that field (a query's source port, say, is anyone's).
    let may = |given: &Option<String>, known: bool, test: &dyn Fn(&str) -> bool| {
        !known || given.as_deref().map_or(true, test)
    };
    may(&r.proto, true, &|p| proto_is(p, f.proto))
        && may(&r.destination, f.query, &|n| holds(n, f.ip))
        && may(&r.source, !f.query, &|n| holds(n, f.ip))
        && may(&r.dport, f.query, &|l| has_port(l, f.port))
        && may(&r.sport, !f.query, &|l| has_port(l, f.port))
        && may(&r.ports, true, &|l| has_port(l, f.port))
}

/// Targets that let the packet go on to the next rule (and so to ours) whatever they do.
const CONTINUE: &[&str] = &[
    "LOG",
    "NFLOG",
    "ULOG",
    "TRACE",
    "AUDIT",
    "MARK",
    "CONNMARK",
    "SECMARK",
    "CONNSECMARK",
    "CLASSIFY",
    "DSCP",
    "TOS",
    "TTL",
    "HL",
    "NOTRACK",
    "CT",
];

/// The rules of one table's save output, by chain, in order.
struct Table<'a> {
    table: &'a str,
    /// User chains declared (`:NAME - [0:0]`).
    declared: Vec<&'a str>,
    rules: Vec<(&'a str, Rule)>,
}

/// How deep jumps are followed; past it a jump counts.
const DEPTH: usize = 8;

impl<'a> Table<'a> {
    fn read(save: &'a str, table: &'a str) -> Table<'a> {
        let (mut declared, mut rules) = (Vec::new(), Vec::new());
        for line in super::rules::table_lines(save, table) {
            if let Some(decl) = line.strip_prefix(':') {
                declared.extend(decl.split(' ').next());
            } else if let Some(r) = rule(line) {
                rules.push((line, r));
            }
        }
        Table {
            table,
            declared,
            rules,
        }
    }

    fn chain(&self, name: &str) -> impl Iterator<Item = &(&'a str, Rule)> {
        let name = name.to_owned();
        self.rules.iter().filter(move |(_, r)| r.chain == name)
    }

    /// Whether `r`, reached for a packet of `flows`, may end the built-in chain's
    /// traversal before our jump (`called`: `r` is in a chain jumped to, where RETURN
    /// only returns).
    fn decides(&self, r: &Rule, flows: &[Flow], called: bool, depth: usize) -> bool {
        if !flows.iter().any(|f| may_match(r, f)) {
            return false;
        }
        if r.goto.is_some() {
            return true;
        }
        let Some(target) = r.jump.as_deref() else {
            return false;
        };
        match target {
            "ACCEPT" => self.table != "filter",
            "RETURN" => !called,
            t if CONTINUE.contains(&t) => false,
            t if t.starts_with("LOCALDNS-") => false,
            // A chain of the table (an empty one continues); any other name is a target
            // extension that may end the traversal (DROP, REJECT, NFQUEUE, ...).
            t if self.declared.contains(&t) || self.chain(t).next().is_some() => {
                depth >= DEPTH
                    || self
                        .chain(t)
                        .any(|(_, inner)| self.decides(inner, flows, true, depth + 1))
            }
            _ => true,
        }
    }
}

/// The foreign rules (as `-A ...` lines) ahead of the jump from `hook.builtin` to
/// `hook.chain` in the save output of `hook.table` that may change what happens to
/// `flows`. Empty when the jump is first, when nothing ahead matters, and when there is
/// no jump (that is the text check's to repair).
pub fn ahead(save: &str, hook: &Hook, flows: &[Flow]) -> Vec<String> {
    let table = Table::read(save, hook.table);
    let mut out = Vec::new();
    for (line, r) in table.chain(hook.builtin) {
        if r.jump.as_deref() == Some(hook.chain) {
            return out;
        }
        if table.decides(r, flows, false, 0) {
            out.push((*line).to_owned());
        }
    }
    Vec::new()
}

/// Whether the first rule of `builtin` in the save output of `table` is `jump` (an
/// `-A BUILTIN ...` line).
pub fn is_first(save: &str, table: &str, builtin: &str, jump: &str) -> bool {
    Table::read(save, table)
        .chain(builtin)
        .next()
        .is_some_and(|(line, _)| *line == jump)
}

/// When more moves than this are needed within [`Brake::window`], the brake engages.
pub const THRESHOLD: usize = 4;
/// The window and the first delay, in rules check intervals; the cap on the delay.
const WINDOW_INTERVALS: u32 = 10;
const CAP_INTERVALS: u32 = 32;

/// Limits how often localdns moves its jumps back to the top (see the module doc).
#[derive(Debug, Clone)]
pub struct Brake {
    interval: Duration,
    moves: VecDeque<Instant>,
    /// Delays given so far in this conflict (the next is `interval × 2^delays`).
    delays: u32,
    until: Option<Instant>,
}

/// What the brake says after a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Moves within the window.
    pub moves: usize,
    pub window: Duration,
    /// How long until the next move may be made.
    pub delay: Duration,
    /// The first delay of this conflict (the brake just engaged).
    pub first: bool,
}

impl Brake {
    /// `interval`: the rules check interval, the unit of every delay.
    pub fn new(interval: Duration) -> Brake {
        Brake {
            interval,
            moves: VecDeque::new(),
            delays: 0,
            until: None,
        }
    }

    pub fn window(&self) -> Duration {
        self.interval * WINDOW_INTERVALS
    }

    /// `None` when a move may be made at `now`; else how long it must still wait.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.until
            .filter(|u| *u > now)
            .map(|u| u.duration_since(now))
    }

    /// Records a move made at `now`; `Some` when the moves are now too many and the next
    /// one must wait.
    pub fn moved(&mut self, now: Instant) -> Option<Backoff> {
        let window = self.window();
        self.moves.push_back(now);
        while self
            .moves
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.moves.pop_front();
        }
        // Once engaged, every move waits until the conflict settles: the moves of the
        // window thin out as the delays grow, which must not let the fight resume.
        if self.moves.len() <= THRESHOLD && self.delays == 0 {
            return None;
        }
        let cap = self.interval * CAP_INTERVALS;
        let delay = self
            .interval
            .checked_mul(1 << self.delays.min(16))
            .map_or(cap, |d| d.min(cap));
        let first = self.delays == 0;
        self.delays += 1;
        self.until = Some(now + delay);
        Some(Backoff {
            moves: self.moves.len(),
            window,
            delay,
            first,
        })
    }

    /// The order was found right at `now`. `true` when this ends a conflict: no move was
    /// needed for a whole window since the brake engaged.
    pub fn settled(&mut self, now: Instant) -> bool {
        let quiet = self
            .moves
            .back()
            .map_or(true, |t| now.duration_since(*t) > self.window());
        if self.delays > 0 && quiet {
            self.delays = 0;
            self.until = None;
            self.moves.clear();
            return true;
        }
        false
    }

    /// Whether the brake is engaged (a conflict not yet settled).
    pub fn engaged(&self) -> bool {
        self.delays > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::rules::HOOKS;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const PRE: &Hook = &HOOKS[0];
    const RAW_OUT: &Hook = &HOOKS[1];
    const INPUT: &Hook = &HOOKS[2];

    fn pre_flows() -> Vec<Flow> {
        flows(
            PRE,
            Family::V4,
            &[ip("169.254.20.10"), ip("10.96.0.10")],
            53,
        )
    }

    fn raw(lines: &str) -> String {
        format!("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:LOCALDNS-PREROUTING - [0:0]\n{lines}-A LOCALDNS-PREROUTING -d 10.96.0.10/32 -p udp -m udp --dport 53 -m socket -j NOTRACK\nCOMMIT\n")
    }

    const JUMP: &str = "-A PREROUTING -m comment --comment localdns -j LOCALDNS-PREROUTING\n";

    #[test]
    fn flows_per_hook() {
        let a = [ip("10.96.0.10"), ip("fd00::10")];
        assert_eq!(flows(PRE, Family::V4, &a, 53).len(), 2);
        assert!(flows(PRE, Family::V4, &a, 53).iter().all(|f| f.query));
        assert_eq!(flows(RAW_OUT, Family::V6, &a, 53).len(), 4);
        assert!(flows(&HOOKS[3], Family::V4, &a, 53)
            .iter()
            .all(|f| !f.query));
    }

    #[test]
    fn words_follow_save_quoting() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a \"b\" -j ACCEPT" -j DROP"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a \"b\" -j ACCEPT",
                "-j",
                "DROP"
            ]
        );
    }

    #[test]
    fn the_foreign_accept_of_the_issue_is_found_and_only_ahead() {
        let accept = "-A PREROUTING -p udp -m udp --dport 53 -j ACCEPT\n";
        let save = raw(&format!("{accept}{JUMP}"));
        assert_eq!(ahead(&save, PRE, &pre_flows()), [accept.trim_end()]);
        // Behind our jump it does not matter.
        assert!(ahead(&raw(&format!("{JUMP}{accept}")), PRE, &pre_flows()).is_empty());
        // No jump: the text check's business.
        assert!(ahead(&raw(accept), PRE, &pre_flows()).is_empty());
        assert!(is_first(&raw(JUMP), "raw", "PREROUTING", JUMP.trim_end()));
        assert!(!is_first(&save, "raw", "PREROUTING", JUMP.trim_end()));
    }

    #[test]
    fn rules_that_cannot_touch_our_dns_do_not_count() {
        for harmless in [
            "-A PREROUTING -p udp -m udp --dport 9 -j ACCEPT",
            "-A PREROUTING -p icmp -j DROP",
            "-A PREROUTING -d 10.0.0.1/32 -j ACCEPT",
            "-A PREROUTING -d 192.168.0.0/16 -p tcp -m tcp --dport 53 -j DROP",
            "-A PREROUTING -p udp -m multiport --dports 80,443,1000:2000 -j ACCEPT",
            "-A PREROUTING -j LOG --log-prefix \"x -j ACCEPT\"",
            "-A PREROUTING -j MARK --set-xmark 0x4000/0x4000",
            "-A PREROUTING -p udp",
            "-A PREROUTING -j CT --notrack",
            "-A PREROUTING -s 10.244.0.0/16 -j NOTRACK",
            // A jump to a chain that only marks and returns.
            "-A PREROUTING -j MARKS",
            "-A PREROUTING -j EMPTY",
        ] {
            let save = raw(&format!(
                ":EMPTY - [0:0]\n{harmless}\n{JUMP}-A MARKS -j MARK --set-mark 1\n-A MARKS -j RETURN\n"
            ));
            assert!(
                ahead(&save, PRE, &pre_flows()).is_empty(),
                "{harmless} counted"
            );
        }
    }

    #[test]
    fn rules_that_may_touch_our_dns_count() {
        for foreign in [
            "-A PREROUTING -p udp -m udp --dport 53 -j ACCEPT",
            "-A PREROUTING -p tcp -m tcp --dport 53 -j DROP",
            "-A PREROUTING -j ACCEPT",
            "-A PREROUTING -d 10.96.0.0/12 -j ACCEPT",
            "-A PREROUTING -d 10.96.0.0/255.240.0.0 -j ACCEPT",
            "-A PREROUTING ! -d 10.96.0.10/32 -j ACCEPT",
            "-A PREROUTING -p udp -m udp ! --dport 9 -j ACCEPT",
            "-A PREROUTING -m set --match-set dns dst -j ACCEPT",
            "-A PREROUTING -p udp -m multiport --dports 1:100 -j RETURN",
            "-A PREROUTING -j NFQUEUE --queue-num 1",
            "-A PREROUTING -g MARKS",
            "-A PREROUTING -j CALI",
            "-A PREROUTING -j DEEP",
        ] {
            let save = raw(&format!(
                "{foreign}\n{JUMP}-A MARKS -j MARK --set-mark 1\n-A CALI -m mark --mark 0x1 -j ACCEPT\n-A DEEP -j CALI\n"
            ));
            assert_eq!(ahead(&save, PRE, &pre_flows()), [foreign], "{foreign}");
        }
    }

    #[test]
    fn in_filter_an_accept_ahead_does_what_ours_does() {
        let jump = "-A INPUT -m comment --comment localdns -j LOCALDNS-INPUT";
        let f = flows(INPUT, Family::V4, &[ip("10.96.0.10")], 53);
        let filter = |ahead_: &str| {
            format!("*filter\n:INPUT DROP [0:0]\n{ahead_}\n{jump}\n-A KUBE-FIREWALL -d 127.0.0.0/8 -j DROP\nCOMMIT\n")
        };
        assert!(ahead(&filter("-A INPUT -p udp -j ACCEPT"), INPUT, &f).is_empty());
        // kube-proxy's jump ahead: its chain drops only what is not ours.
        assert!(ahead(&filter("-A INPUT -j KUBE-FIREWALL"), INPUT, &f).is_empty());
        let drop = "-A INPUT -p udp -m udp --dport 53 -j DROP";
        assert_eq!(ahead(&filter(drop), INPUT, &f), [drop]);
        assert_eq!(ahead(&filter("-A INPUT -j RETURN"), INPUT, &f).len(), 1);
        // Answers on OUTPUT are matched by their source.
        let out = flows(&HOOKS[3], Family::V4, &[ip("10.96.0.10")], 53);
        let save = "*filter\n-A OUTPUT -s 10.96.0.10/32 -p udp -j REJECT\n-A OUTPUT -s 10.0.0.1/32 -j REJECT\n-A OUTPUT -j LOCALDNS-OUTPUT\nCOMMIT\n";
        assert_eq!(
            ahead(save, &HOOKS[3], &out),
            ["-A OUTPUT -s 10.96.0.10/32 -p udp -j REJECT"]
        );
    }

    #[test]
    fn addresses_and_ports() {
        assert!(holds("10.96.0.0/12", ip("10.96.0.10")));
        assert!(!holds("10.112.0.0/12", ip("10.96.0.10")));
        assert!(holds("0.0.0.0/0", ip("10.96.0.10")));
        assert!(holds("fd00::/8", ip("fd00::10")));
        assert!(!holds("fd01::/16", ip("fd00::10")));
        assert!(holds("garbage", ip("fd00::10")));
        assert!(!holds("10.96.0.11", ip("10.96.0.10")));
        assert!(has_port("1:1024", 53) && has_port("53", 53) && has_port("54,53", 53));
        assert!(!has_port("54:60,80", 53));
        assert!(has_port("domain", 53), "unreadable counts");
    }

    #[test]
    fn the_brake_engages_after_the_threshold_and_doubles_up_to_the_cap() {
        let i = Duration::from_secs(1);
        let mut b = Brake::new(i);
        let t0 = Instant::now();
        for n in 0..THRESHOLD as u64 {
            assert_eq!(b.wait(t0), None);
            assert_eq!(b.moved(t0 + Duration::from_millis(100 * n)), None);
        }
        let mut t = t0 + Duration::from_secs(1);
        let mut last = t;
        let mut delays = Vec::new();
        for _ in 0..8 {
            last = t;
            let back = b.moved(t).expect("engaged");
            assert_eq!(back.first, delays.is_empty());
            assert!(b.wait(t).is_some());
            delays.push(back.delay.as_secs());
            t += back.delay;
            assert_eq!(b.wait(t), None);
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 32, 32]);
        assert!(b.engaged());
        // Order right, but the last move is recent: still in conflict.
        assert!(!b.settled(last + i));
        assert!(b.engaged());
        // A whole window without a move ends it.
        assert!(b.settled(last + b.window() + i));
        assert!(!b.engaged());
        assert_eq!(b.wait(last + b.window() + i), None);
        assert_eq!(b.moved(last + b.window() * 2), None);
    }

    #[test]
    fn moves_spread_over_more_than_a_window_never_engage_it() {
        let i = Duration::from_secs(1);
        let mut b = Brake::new(i);
        let t0 = Instant::now();
        for n in 0..50u32 {
            assert_eq!(b.moved(t0 + i * 3 * n), None);
        }
    }
}
