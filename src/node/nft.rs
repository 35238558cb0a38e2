//! The `nft` tool: run with a bound on its time (for the native backend, see
//! [`super::nftables`]), and used for the one thing the iptables-nft tools cannot do:
//! delete a whole nf_tables table.
//!
//! iptables-nft creates the `ip`/`ip6` `raw` and `filter` tables the first time a rule goes
//! into them, and no iptables command deletes a table again, so a teardown that removes
//! only localdns's chains would leave empty tables behind that were not there before
//! setup. Setup therefore records which tables it created (when `nft` is installed, which
//! it is wherever nftables is the firewall: Debian 11+, RHEL 8+), and teardown deletes
//! those that are still empty, leaving every table someone else put a rule or a chain in.
//! Without `nft`, nothing is recorded and empty tables stay (harmless: base chains with
//! an accept policy), which the setup log says.

use std::time::Duration;

/// Bound on one `nft` run.
const LIMIT: Duration = Duration::from_secs(10);

fn nft(args: &[&str]) -> Result<String, String> {
    run(args, None).map_err(|e| e.to_string())
}

/// Why `nft` failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft: {0} (is the nftables package installed?)")]
    Missing(std::io::Error),
    #[error("nft {args}: exit {code}: {stderr}")]
    Failed {
        args: String,
        code: i32,
        stderr: String,
    },
    #[error("nft {args}: no answer within {LIMIT:?}")]
    Hung { args: String },
}

impl NftError {
    /// nft's answer for a table, chain or rule that does not exist.
    pub fn is_absent(&self) -> bool {
        matches!(self, NftError::Failed { stderr, .. } if stderr.contains("No such file or directory"))
    }
}

/// `nft ARGS` with `stdin`, bounded in time: its stdout, or why it failed.
pub fn run(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    match crate::process::run_bounded("nft", args, stdin, LIMIT) {
        Ok(Some((0, out, _))) => Ok(out),
        Ok(Some((code, _, err))) => Err(NftError::Failed {
            args: args.join(" "),
            code,
            stderr: err.trim().to_owned(),
        }),
        Ok(None) => Err(NftError::Hung {
            args: args.join(" "),
        }),
        Err(e) => Err(NftError::Missing(e)),
    }
}

/// Every table as `family name` (`ip raw`), or None when `nft` cannot be run.
pub fn tables() -> Option<Vec<String>> {
    nft(&["list", "tables"]).ok().map(|out| parse_tables(&out))
}

/// `nft list tables` prints `table FAMILY NAME` lines.
pub fn parse_tables(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some("table"), Some(family), Some(name)) => Some(format!("{family} {name}")),
                _ => None,
            }
        })
        .collect()
}

/// Whether `nft list table` output holds nothing but base chains with an accept policy:
/// no rule, no set, no chain of someone's own (a chain without a hook), no other policy.
/// Anything not understood counts as content.
pub fn is_empty_table(listing: &str) -> bool {
    let mut chain_opened = false;
    for l in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let base_chain = l.starts_with("type ") && l.ends_with("policy accept;");
        if chain_opened && !base_chain {
            return false;
        }
        chain_opened = l.starts_with("chain ") && l.ends_with('{');
        let fine =
            l == "}" || (l.starts_with("table ") && l.ends_with('{')) || chain_opened || base_chain;
        if !fine {
            return false;
        }
    }
    !chain_opened
}

/// Delete `table` (`family name`) if it holds nothing (see [`is_empty_table`]).
/// `Ok(true)` when it was deleted, `Ok(false)` when absent or not empty.
pub fn delete_if_empty(table: &str) -> Result<bool, String> {
    let mut words = table.split_whitespace();
    let (Some(family), Some(name)) = (words.next(), words.next()) else {
        return Ok(false);
    };
    let Ok(listing) = nft(&["list", "table", family, name]) else {
        return Ok(false);
    };
    if !is_empty_table(&listing) {
        return Ok(false);
    }
    nft(&["delete", "table", family, name]).map(|_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_listed_by_family_and_name() {
        let out = "table ip filter\ntable ip6 raw\ntable inet kube-proxy\n";
        assert_eq!(
            parse_tables(out),
            ["ip filter", "ip6 raw", "inet kube-proxy"]
        );
        assert!(parse_tables("").is_empty());
    }

    #[test]
    fn only_base_chains_with_accept_policy_are_empty() {
        let empty = "table ip raw {\n\tchain PREROUTING {\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t}\n\n\tchain OUTPUT {\n\t\ttype filter hook output priority raw; policy accept;\n\t}\n}\n";
        assert!(is_empty_table(empty));
        let rule = empty.replace(
            "policy accept;\n\t}\n\n",
            "policy accept;\n\t\tudp dport 53 notrack\n\t}\n\n",
        );
        assert!(!is_empty_table(&rule));
        let drop = empty.replace("policy accept;", "policy drop;");
        assert!(!is_empty_table(&drop));
        // A chain without a hook is someone's own chain, even with nothing in it.
        assert!(!is_empty_table(
            "table ip raw {\n\tchain KUBE-X {\n\t}\n}\n"
        ));
        assert!(!is_empty_table("table ip raw {\n\tset s {\n\t}\n}\n"));
    }
}
