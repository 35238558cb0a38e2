//! The firewall rules as data: what localdns installs for its listen addresses, and the
//! `iptables-restore` input that installs or removes it. Pure functions over text, so that
//! the exact rules are unit-tested without root.
//!
//! Every rule lives in one of localdns's own chains (`LOCALDNS-*`), reached by one jump
//! rule from the built-in chain. Installing rewrites those chains whole (a `:CHAIN` line
//! in `iptables-restore --noflush` creates or flushes it) and adds a jump only where none
//! exists, so running it twice never duplicates a rule; removal deletes exactly the jumps
//! to `LOCALDNS-*` chains and those chains, nothing else.
//!
//! Fail-open: the raw PREROUTING rule matches only while a local socket would receive
//! the packet (`-m socket`, deliberately *without* `--nowildcard`, which would also match
//! other daemons' sockets bound to 0.0.0.0). While localdns is dead, queries to the
//! kube-dns Service IP are tracked and DNATed by kube-proxy as if localdns were not
//! installed. The reply rule (raw OUTPUT `-s IP --sport PORT`) keeps localdns's answers
//! out of conntrack, so a client that reuses its source port is not caught by a stale
//! entry after a switch. `-m socket` is refused in OUTPUT chains, so queries from the
//! node itself are NOTRACKed unconditionally.

use std::net::IpAddr;

/// The word every rule's comment starts with.
pub const TAG: &str = "localdns";

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `iptables` or `ip6tables`.
    pub fn command(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// One of localdns's chains and the built-in chain that jumps to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub table: &'static str,
    pub builtin: &'static str,
    pub chain: &'static str,
}

/// localdns's chains, in install order. The tables are listed raw first, then filter.
pub const HOOKS: [Hook; 4] = [
    Hook {
        table: "raw",
        builtin: "PREROUTING",
        chain: "LOCALDNS-PREROUTING",
    },
    Hook {
        table: "raw",
        builtin: "OUTPUT",
        chain: "LOCALDNS-OUTPUT",
    },
    Hook {
        table: "filter",
        builtin: "INPUT",
        chain: "LOCALDNS-INPUT",
    },
    Hook {
        table: "filter",
        builtin: "OUTPUT",
        chain: "LOCALDNS-OUTPUT",
    },
];

/// The tables localdns writes to.
pub const TABLES: [&str; 2] = ["raw", "filter"];

fn is_our_chain(name: &str) -> bool {
    name.starts_with("LOCALDNS-")
}

/// The jump from `hook.builtin` to `hook.chain`, as the arguments after `-A BUILTIN`.
pub fn jump(hook: &Hook) -> String {
    format!("-m comment --comment {TAG} -j {}", hook.chain)
}

/// The rules of `hook.chain` for the addresses of one family, as the arguments after
/// `-A CHAIN`. Empty when no address is of that family.
pub fn chain_rules(hook: &Hook, family: Family, addresses: &[IpAddr], port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for ip in addresses.iter().filter(|ip| Family::of(ip) == family) {
        let host = format!("{ip}/{}", family.host_prefix());
        for proto in ["udp", "tcp"] {
            let m = format!("-p {proto} -m {proto}");
            let query = format!("-d {host} {m} --dport {port}");
            let reply = format!("-s {host} {m} --sport {port}");
            match (hook.table, hook.builtin) {
                ("raw", "PREROUTING") => out.push(format!(
                    "{query} -m socket -m comment --comment \"{TAG}: DNS to {ip} skips conntrack while a socket listens\" -j NOTRACK"
                )),
                ("raw", "OUTPUT") => {
                    out.push(format!(
                        "{query} -m comment --comment \"{TAG}: DNS from the node to {ip} skips conntrack\" -j NOTRACK"
                    ));
                    out.push(format!(
                        "{reply} -m comment --comment \"{TAG}: answers from {ip} skip conntrack\" -j NOTRACK"
                    ));
                }
                ("filter", "INPUT") => out.push(format!(
                    "{query} -m comment --comment \"{TAG}: accept DNS to {ip}\" -j ACCEPT"
                )),
                ("filter", "OUTPUT") => out.push(format!(
                    "{reply} -m comment --comment \"{TAG}: accept answers from {ip}\" -j ACCEPT"
                )),
                _ => {}
            }
        }
    }
    out
}

/// What localdns has in one table, read from `iptables-save -t TABLE` output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ours {
    /// `LOCALDNS-*` chains declared in the table.
    pub chains: Vec<String>,
    /// Rules of those chains, as `-A CHAIN ...` lines.
    pub rules: Vec<String>,
    /// Rules of other chains jumping to a `LOCALDNS-*` chain, as `-A CHAIN ...` lines.
    pub jumps: Vec<String>,
}

impl Ours {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.rules.is_empty() && self.jumps.is_empty()
    }

    /// Whether a jump from `builtin` to `chain` exists.
    pub fn has_jump(&self, builtin: &str, chain: &str) -> bool {
        self.jumps
            .iter()
            .any(|l| chain_of(l) == Some(builtin) && target_of(l) == Some(chain))
    }
}

/// Whether `line` (an `-A ...` line) is the jump from `hook.builtin` to `hook.chain`.
pub fn is_jump(line: &str, hook: &Hook) -> bool {
    chain_of(line) == Some(hook.builtin) && target_of(line) == Some(hook.chain)
}

/// The chain an `-A CHAIN ...` line appends to.
fn chain_of(line: &str) -> Option<&str> {
    line.strip_prefix("-A ")?.split(' ').next()
}

/// The `-j TARGET` of a rule line (the last one: comments never contain " -j ").
fn target_of(line: &str) -> Option<&str> {
    let (_, rest) = line.rsplit_once(" -j ")?;
    rest.split(' ').next()
}

/// The lines of `table`'s section of a save output (`:CHAIN` declarations, `-A` rules,
/// `COMMIT`), trailing blanks trimmed.
pub fn table_lines<'a>(save: &'a str, table: &'a str) -> impl Iterator<Item = &'a str> {
    let mut in_table = false;
    save.lines().filter_map(move |line| {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            in_table = name == table;
            return None;
        }
        in_table.then_some(line)
    })
}

/// Picks localdns's chains, rules and jumps out of the save output of `table`.
pub fn parse(save: &str, table: &str) -> Ours {
    let mut ours = Ours::default();
    for line in table_lines(save, table) {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split(' ').next().unwrap_or_default();
            if is_our_chain(name) {
                ours.chains.push(name.to_owned());
            }
        } else if let Some(chain) = chain_of(line) {
            if is_our_chain(chain) {
                ours.rules.push(line.to_owned());
            } else if target_of(line).is_some_and(is_our_chain) {
                ours.jumps.push(line.to_owned());
            }
        }
    }
    ours
}

/// `iptables-restore --noflush` input that makes `table` hold exactly localdns's chains
/// with `rules(hook)` and one jump to each, first in its built-in chain, given what the
/// table holds now (`buried`: the built-in chains where our jump is not the first rule).
pub fn install_input(
    table: &str,
    now: &Ours,
    rules: &dyn Fn(&Hook) -> Vec<String>,
    buried: &[&str],
) -> String {
    let hooks: Vec<&Hook> = HOOKS.iter().filter(|h| h.table == table).collect();
    let mut out = format!("*{table}\n");
    for h in &hooks {
        // In --noflush mode this creates the chain, or flushes it if it exists.
        out.push_str(&format!(":{} - [0:0]\n", h.chain));
    }
    for h in &hooks {
        for r in rules(h) {
            out.push_str(&format!("-A {} {r}\n", h.chain));
        }
    }
    for h in &hooks {
        let mut found = now.jumps.iter().filter(|l| is_jump(l, h));
        match found.next() {
            None => out.push_str(&format!("-I {} 1 {}\n", h.builtin, jump(h))),
            // Moved to the top in the same commit: never a moment without it.
            Some(kept) if buried.contains(&h.builtin) => {
                out.push_str(&delete_line(kept));
                out.push_str(&format!("-I {} 1 {}\n", h.builtin, jump(h)));
            }
            Some(_) => {}
        }
        // A duplicate jump (an older install, a hand-made one) is removed.
        for extra in found {
            out.push_str(&delete_line(extra));
        }
    }
    // A LOCALDNS-* chain of this table that is not ours to keep (none today, but a
    // renamed chain in a later version) goes away with its jumps.
    for chain in &now.chains {
        if !hooks.iter().any(|h| h.chain == chain) {
            for j in now.jumps.iter().filter(|l| target_of(l) == Some(chain)) {
                out.push_str(&delete_line(j));
            }
            out.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// `iptables-restore --noflush` input that moves each of `jumps` (`-A BUILTIN ...` lines
/// of `table`) to the top of its chain, in one commit.
pub fn move_first_input(table: &str, jumps: &[&str]) -> String {
    let mut out = format!("*{table}\n");
    for j in jumps {
        out.push_str(&delete_line(j));
        if let Some(rest) = j.strip_prefix("-A ") {
            let (chain, args) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("-I {chain} 1 {args}\n"));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// `iptables-restore --noflush` input that removes every jump to a `LOCALDNS-*` chain
/// and every such chain from `table`; `None` when there is nothing of localdns's there.
pub fn remove_input(table: &str, now: &Ours) -> Option<String> {
    if now.is_empty() {
        return None;
    }
    let mut out = format!("*{table}\n");
    for j in &now.jumps {
        out.push_str(&delete_line(j));
    }
    for chain in &now.chains {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in &now.chains {
        out.push_str(&format!("-X {chain}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// The built-in chains among INPUT and OUTPUT of a filter table's save output whose
/// policy is DROP: where DNS to localdns needs localdns's ACCEPT rules.
pub fn drops_by_default(save: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    for line in table_lines(save, "filter") {
        for chain in ["INPUT", "OUTPUT"] {
            if line.starts_with(&format!(":{chain} DROP ")) {
                out.push(chain);
            }
        }
    }
    out
}

/// `-A CHAIN ARGS` → `-D CHAIN ARGS\n`: iptables-restore reads the arguments with the
/// same quoting iptables-save wrote them with.
fn delete_line(append: &str) -> String {
    format!("-D {}\n", append.strip_prefix("-A ").unwrap_or(append))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn rules_per_address_and_protocol() {
        let a = ips(&["169.254.20.10", "10.96.0.10", "fd00::10"]);
        let pre = chain_rules(&HOOKS[0], Family::V4, &a, 53);
        assert_eq!(pre.len(), 4);
        assert_eq!(
            pre[0],
            "-d 169.254.20.10/32 -p udp -m udp --dport 53 -m socket -m comment --comment \"localdns: DNS to 169.254.20.10 skips conntrack while a socket listens\" -j NOTRACK"
        );
        assert!(pre[3].starts_with("-d 10.96.0.10/32 -p tcp -m tcp --dport 53 -m socket "));
        assert!(pre.iter().all(|r| !r.contains("nowildcard")));

        let out = chain_rules(&HOOKS[1], Family::V4, &a, 53);
        assert_eq!(out.len(), 8);
        assert!(out[0].starts_with("-d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment"));
        assert!(out[1].starts_with("-s 169.254.20.10/32 -p udp -m udp --sport 53 -m comment"));
        assert!(out
            .iter()
            .all(|r| r.ends_with("-j NOTRACK") && !r.contains("socket")));

        let input = chain_rules(&HOOKS[2], Family::V6, &a, 5353);
        assert_eq!(
            input,
            [
                "-d fd00::10/128 -p udp -m udp --dport 5353 -m comment --comment \"localdns: accept DNS to fd00::10\" -j ACCEPT",
                "-d fd00::10/128 -p tcp -m tcp --dport 5353 -m comment --comment \"localdns: accept DNS to fd00::10\" -j ACCEPT",
            ]
        );
        let output = chain_rules(&HOOKS[3], Family::V6, &a, 53);
        assert!(output[0].starts_with("-s fd00::10/128 -p udp -m udp --sport 53 "));
        assert!(output.iter().all(|r| r.ends_with("-j ACCEPT")));

        assert!(chain_rules(&HOOKS[0], Family::V6, &ips(&["10.0.0.1"]), 53).is_empty());
        // Every rule names localdns.
        for h in &HOOKS {
            for r in chain_rules(h, Family::V4, &a, 53) {
                assert!(r.contains("--comment \"localdns: "), "{r}");
            }
            assert!(jump(h).contains("--comment localdns "));
        }
    }

    const SAVED: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LOCALDNS-PREROUTING - [0:0]
:OTHER - [0:0]
-A PREROUTING -p udp --dport 9 -j ACCEPT
-A PREROUTING -m comment --comment localdns -j LOCALDNS-PREROUTING
-A LOCALDNS-PREROUTING -d 10.96.0.10/32 -p udp -m udp --dport 53 -m socket -m comment --comment \"localdns: x -j y\" -j NOTRACK
-A OTHER -m comment --comment \"see -j LOCALDNS-X\" -j RETURN
COMMIT
*filter
:INPUT ACCEPT [10:20]
:LOCALDNS-INPUT - [0:0]
-A INPUT -j LOCALDNS-INPUT
COMMIT
";

    #[test]
    fn parse_finds_only_ours() {
        let raw = parse(SAVED, "raw");
        assert_eq!(raw.chains, ["LOCALDNS-PREROUTING"]);
        assert_eq!(raw.rules.len(), 1);
        assert_eq!(
            raw.jumps,
            ["-A PREROUTING -m comment --comment localdns -j LOCALDNS-PREROUTING"]
        );
        assert!(raw.has_jump("PREROUTING", "LOCALDNS-PREROUTING"));
        assert!(!raw.has_jump("OUTPUT", "LOCALDNS-OUTPUT"));
        let filter = parse(SAVED, "filter");
        assert_eq!(filter.chains, ["LOCALDNS-INPUT"]);
        assert_eq!(filter.jumps, ["-A INPUT -j LOCALDNS-INPUT"]);
        assert!(parse(SAVED, "nat").is_empty());
    }

    #[test]
    fn install_rewrites_chains_and_adds_missing_jumps_only() {
        let now = parse(SAVED, "raw");
        let input = install_input(
            "raw",
            &now,
            &|h| vec![format!("-j NOTRACK-{}", h.builtin)],
            &[],
        );
        assert_eq!(
            input,
            "*raw\n\
             :LOCALDNS-PREROUTING - [0:0]\n\
             :LOCALDNS-OUTPUT - [0:0]\n\
             -A LOCALDNS-PREROUTING -j NOTRACK-PREROUTING\n\
             -A LOCALDNS-OUTPUT -j NOTRACK-OUTPUT\n\
             -I OUTPUT 1 -m comment --comment localdns -j LOCALDNS-OUTPUT\n\
             COMMIT\n"
        );
        let fresh = install_input("filter", &Ours::default(), &|_| vec![], &[]);
        assert!(fresh.contains("-I INPUT 1 -m comment --comment localdns -j LOCALDNS-INPUT\n"));
        assert!(fresh.contains("-I OUTPUT 1 -m comment --comment localdns -j LOCALDNS-OUTPUT\n"));
    }

    #[test]
    fn install_drops_duplicate_jumps_and_foreign_localdns_chains() {
        let now = Ours {
            chains: vec!["LOCALDNS-INPUT".into(), "LOCALDNS-OLD".into()],
            rules: vec![],
            jumps: vec![
                "-A INPUT -j LOCALDNS-INPUT".into(),
                "-A INPUT -m comment --comment localdns -j LOCALDNS-INPUT".into(),
                "-A FORWARD -j LOCALDNS-OLD".into(),
            ],
        };
        let input = install_input("filter", &now, &|_| vec![], &[]);
        assert!(!input.contains("-I INPUT"));
        // A jump with a rule ahead is moved to the top in the same commit.
        let moved = install_input("filter", &now, &|_| vec![], &["INPUT"]);
        assert!(moved.contains(
            "-D INPUT -j LOCALDNS-INPUT\n-I INPUT 1 -m comment --comment localdns -j LOCALDNS-INPUT\n"
        ));
        assert!(input.contains("-D INPUT -m comment --comment localdns -j LOCALDNS-INPUT\n"));
        assert!(input.contains("-D FORWARD -j LOCALDNS-OLD\n-F LOCALDNS-OLD\n-X LOCALDNS-OLD\n"));
    }

    #[test]
    fn a_drop_policy_on_input_or_output_is_found() {
        let save =
            "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [3:4]\nCOMMIT\n";
        assert_eq!(drops_by_default(save), ["INPUT"]);
        let both = save.replace(":OUTPUT ACCEPT", ":OUTPUT DROP");
        assert_eq!(drops_by_default(&both), ["INPUT", "OUTPUT"]);
        assert!(drops_by_default(&save.replace("DROP", "ACCEPT")).is_empty());
        // Another table's policy does not count.
        assert!(drops_by_default(&save.replace("*filter", "*mangle")).is_empty());
        assert!(drops_by_default("").is_empty());
    }

    #[test]
    fn a_move_deletes_and_inserts_at_the_top_in_one_commit() {
        assert_eq!(
            move_first_input(
                "raw",
                &["-A PREROUTING -m comment --comment localdns -j LOCALDNS-PREROUTING"]
            ),
            "*raw\n\
             -D PREROUTING -m comment --comment localdns -j LOCALDNS-PREROUTING\n\
             -I PREROUTING 1 -m comment --comment localdns -j LOCALDNS-PREROUTING\n\
             COMMIT\n"
        );
    }

    #[test]
    fn remove_deletes_jumps_then_chains() {
        assert_eq!(
            remove_input("raw", &parse(SAVED, "raw")).unwrap(),
            "*raw\n\
             -D PREROUTING -m comment --comment localdns -j LOCALDNS-PREROUTING\n\
             -F LOCALDNS-PREROUTING\n\
             -X LOCALDNS-PREROUTING\n\
             COMMIT\n"
        );
        assert_eq!(remove_input("nat", &parse(SAVED, "nat")), None);
    }
}
