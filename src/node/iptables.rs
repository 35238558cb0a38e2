//! The iptables backend: `iptables-nft` or `iptables-legacy`, driven through their
//! `-save` and `-restore` binaries.
//!
//! Why not the `iptables` crate: it runs plain `iptables`/`ip6tables` (no way to choose
//! the nft or legacy variant) and passes `--wait` without a bound, so a stuck lock holder
//! would hang localdns. Here every call waits for the xtables lock at most
//! `xtables_wait` (`-w`), is killed if it still runs past that, and is retried twice.
//!
//! Reads of one table: `iptables-nft -t TABLE -S`, turned into the save form
//! ([`listing_to_save`]), because `iptables-nft-save -t TABLE` fetches the whole ruleset
//! first (on a node with kube-proxy's 40,000 nat rules, 0.3 s for a 500-rule filter table
//! against 0.02 s); legacy reads use `iptables-legacy-save -t TABLE`, which reads only the
//! table. Writes use `*-restore --noflush`, so each table changes atomically. Reading must
//! never create a table: legacy `-save -t` would, so legacy tables are read only if the
//! kernel lists them (`iptables-nft -S` creates nothing).

use std::time::Duration;

use super::rules::Family;

/// Which iptables variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nft,
    Legacy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nft => "nft",
            Kind::Legacy => "legacy",
        }
    }

    /// e.g. `ip6tables-legacy-restore`.
    pub fn program(self, family: Family, tool: &str) -> String {
        format!("{}-{}-{tool}", family.command(), self.name())
    }
}

/// Why a firewall call failed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot run {program}: {source} (is the iptables package installed?)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{program} did not finish within {wait:?}, {attempts} times: another program holds the xtables lock")]
    Locked {
        program: String,
        wait: Duration,
        attempts: u32,
    },
    #[error("the rules changed again right after each of 3 installs: another agent keeps rewriting them")]
    Unstable,
    #[error("no firewall can be run: {0}")]
    NoBackend(String),
    #[error("{0}")]
    Nft(#[from] super::nft::NftError),
}

/// The firewall as localdns uses it. Implemented by [`Iptables`]; tests fake it.
pub trait Tables: Send + Sync {
    fn kind(&self) -> Kind;
    /// The save output of one table; `None` when the table does not exist. Never creates it.
    fn save(&self, family: Family, table: &str) -> Result<Option<String>, RulesError>;
    /// Applies `iptables-restore --noflush` input.
    fn restore(&self, family: Family, input: &str) -> Result<(), RulesError>;
}

/// The real binaries of one backend.
#[derive(Debug, Clone)]
pub struct Iptables {
    kind: Kind,
    /// Bound on the xtables lock wait per call.
    wait: Duration,
}

/// [`crate::process::run_bounded`], with a failure to start named as such.
fn run_bounded(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
) -> Result<Option<(i32, String, String)>, RulesError> {
    crate::process::run_bounded(program, args, stdin, limit).map_err(|source| RulesError::Spawn {
        program: program.to_owned(),
        source,
    })
}

/// Exit status iptables uses when it could not get the xtables lock in time.
const EXIT_RESOURCE: i32 = 4;
const ATTEMPTS: u32 = 3;

impl Iptables {
    pub fn new(kind: Kind, wait: Duration) -> Self {
        Self { kind, wait }
    }

    /// Counts kube-proxy's lines and all rules over both families (all tables).
    pub fn census(&self) -> Result<Census, RulesError> {
        let mut total = Census::default();
        for family in Family::ALL {
            let out = self.run(&self.kind.program(family, "save"), &[], None)?;
            let c = Census::of(&out);
            total.kube += c.kube;
            total.rules += c.rules;
        }
        Ok(total)
    }

    /// Whether the legacy kernel table exists in this network namespace.
    fn legacy_table_exists(family: Family, table: &str) -> bool {
        let names = match family {
            Family::V4 => "/proc/net/ip_tables_names",
            Family::V6 => "/proc/net/ip6_tables_names",
        };
        std::fs::read_to_string(names).is_ok_and(|s| s.lines().any(|l| l.trim() == table))
    }

    /// Runs `program args` with `stdin`, bounded by the lock wait plus a margin; retried
    /// when the lock could not be had.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RulesError> {
        let limit = self.wait + Duration::from_secs(5);
        for attempt in 1..=ATTEMPTS {
            match run_bounded(program, args, stdin, limit)? {
                Some((0, stdout, _)) => return Ok(stdout),
                Some((code, _, stderr)) if code != EXIT_RESOURCE => {
                    return Err(RulesError::Failed {
                        program: program.to_owned(),
                        status: format!("exit status {code}"),
                        stderr: stderr.trim().to_owned(),
                    })
                }
                // Exit status 4, or killed at the limit: the lock was not to be had.
                _ => tracing::warn!(
                    program,
                    attempt,
                    "the xtables lock is held by another program; retrying"
                ),
            }
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
        }
        Err(RulesError::Locked {
            program: program.to_owned(),
            wait: limit,
            attempts: ATTEMPTS,
        })
    }
}

impl Tables for Iptables {
    fn kind(&self) -> Kind {
        self.kind
    }

    fn save(&self, family: Family, table: &str) -> Result<Option<String>, RulesError> {
        match self.kind {
            Kind::Legacy if !Self::legacy_table_exists(family, table) => Ok(None),
            Kind::Legacy => self
                .run(&self.kind.program(family, "save"), &["-t", table], None)
                .map(Some),
            Kind::Nft => {
                let program = format!("{}-nft", family.command());
                self.run(&program, &["-t", table, "-S"], None)
                    .map(|listing| Some(listing_to_save(table, &listing)))
            }
        }
    }

    fn restore(&self, family: Family, input: &str) -> Result<(), RulesError> {
        let secs = self.wait.as_secs().max(1).to_string();
        self.run(
            &self.kind.program(family, "restore"),
            &["--noflush", "-w", &secs],
            Some(input),
        )
        .map(|_| ())
    }
}

/// `iptables -t TABLE -S` output in the form `iptables-save -t TABLE` prints (counters
/// zero): `-P CHAIN POLICY` → `:CHAIN POLICY [0:0]`, `-N CHAIN` → `:CHAIN - [0:0]`, rules
/// as they are (both print them with the same code).
pub fn listing_to_save(table: &str, listing: &str) -> String {
    let mut out = format!("*{table}\n");
    for line in listing.lines() {
        if let Some(policy) = line.strip_prefix("-P ") {
            out.push_str(&format!(":{policy} [0:0]\n"));
        } else if let Some(chain) = line.strip_prefix("-N ") {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        } else if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// What a backend holds, for choosing the one kube-proxy uses.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    /// Lines naming a `KUBE-` chain (kube-proxy's, kubelet's canaries).
    pub kube: usize,
    /// Rules (`-A` lines), localdns's own excluded.
    pub rules: usize,
}

impl Census {
    pub fn of(save: &str) -> Census {
        let mut c = Census::default();
        for line in save.lines().filter(|l| !l.contains("LOCALDNS-")) {
            if line.contains("KUBE-") {
                c.kube += 1;
            }
            if line.starts_with("-A ") {
                c.rules += 1;
            }
        }
        c
    }
}

/// The backend kube-proxy uses: the one holding `KUBE-` chains (more of them wins), else
/// the one with more rules, else nft. `None` for a backend that cannot be run.
pub fn pick(nft: Option<&Census>, legacy: Option<&Census>) -> Option<(Kind, String)> {
    match (nft, legacy) {
        (None, None) => None,
        (Some(_), None) => Some((Kind::Nft, "iptables-legacy is not available".into())),
        (None, Some(_)) => Some((Kind::Legacy, "iptables-nft is not available".into())),
        (Some(n), Some(l)) => Some(if n.kube != l.kube {
            let kind = if n.kube > l.kube {
                Kind::Nft
            } else {
                Kind::Legacy
            };
            (
                kind,
                format!(
                    "it holds kube-proxy's chains (KUBE-* lines: nft {}, legacy {})",
                    n.kube, l.kube
                ),
            )
        } else if n.rules != l.rules {
            let kind = if n.rules > l.rules {
                Kind::Nft
            } else {
                Kind::Legacy
            };
            (
                kind,
                format!(
                    "no kube-proxy chains; it holds more rules (nft {}, legacy {})",
                    n.rules, l.rules
                ),
            )
        } else {
            (
                Kind::Nft,
                format!(
                    "no kube-proxy chains, {} rules in each: nft by default",
                    n.rules
                ),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn census_counts_kube_lines_and_rules_but_not_ours() {
        let save = "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n*raw\n:LOCALDNS-OUTPUT - [0:0]\n-A OUTPUT -j LOCALDNS-OUTPUT\nCOMMIT\n";
        assert_eq!(Census::of(save), Census { kube: 2, rules: 2 });
    }

    #[test]
    fn kube_proxy_chains_win_then_rule_count_then_nft() {
        let c = |kube, rules| Census { kube, rules };
        let kind = |n: Option<Census>, l: Option<Census>| pick(n.as_ref(), l.as_ref()).map(|p| p.0);
        assert_eq!(kind(Some(c(0, 50)), Some(c(3, 4))), Some(Kind::Legacy));
        assert_eq!(kind(Some(c(9, 10)), Some(c(3, 40))), Some(Kind::Nft));
        assert_eq!(kind(Some(c(0, 1)), Some(c(0, 4))), Some(Kind::Legacy));
        assert_eq!(kind(Some(c(0, 4)), Some(c(0, 4))), Some(Kind::Nft));
        assert_eq!(kind(None, Some(c(0, 0))), Some(Kind::Legacy));
        assert_eq!(kind(Some(c(0, 0)), None), Some(Kind::Nft));
        assert_eq!(kind(None, None), None);
    }

    #[test]
    fn a_listing_reads_as_the_save_output() {
        let listing = "-P INPUT DROP\n-P OUTPUT ACCEPT\n-N LOCALDNS-INPUT\n\
                       -A INPUT -m comment --comment localdns -j LOCALDNS-INPUT\n\
                       -A LOCALDNS-INPUT -d 10.96.0.10/32 -p udp -m comment --comment \"a b\" -m udp --dport 53 -j ACCEPT\n";
        let save = listing_to_save("filter", listing);
        assert_eq!(
            save,
            "*filter\n:INPUT DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:LOCALDNS-INPUT - [0:0]\n\
             -A INPUT -m comment --comment localdns -j LOCALDNS-INPUT\n\
             -A LOCALDNS-INPUT -d 10.96.0.10/32 -p udp -m comment --comment \"a b\" -m udp --dport 53 -j ACCEPT\n\
             COMMIT\n"
        );
        // What the rest of the module reads from it.
        let ours = super::super::rules::parse(&save, "filter");
        assert_eq!(ours.chains, ["LOCALDNS-INPUT"]);
        assert_eq!(ours.jumps.len(), 1);
        assert_eq!(ours.rules.len(), 1);
        assert_eq!(super::super::rules::drops_by_default(&save), ["INPUT"]);
    }

    #[test]
    fn program_names() {
        assert_eq!(Kind::Nft.program(Family::V4, "save"), "iptables-nft-save");
        assert_eq!(
            Kind::Legacy.program(Family::V6, "restore"),
            "ip6tables-legacy-restore"
        );
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let e =
            run_bounded("/nonexistent/iptables-x", &[], None, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/iptables-x"));
    }

    #[test]
    fn a_hanging_program_is_killed_at_the_limit() {
        let t = Instant::now();
        let r = run_bounded("sleep", &["10"], None, Duration::from_millis(200)).unwrap();
        assert!(r.is_none());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
