//! Installing, checking and removing localdns's rules over a [`Tables`] backend.
//!
//! Install writes one `iptables-restore --noflush` input per family (raw and filter
//! together), then reads back what the kernel holds: that [`Snapshot`], in the backend's
//! own canonical form, is what the drift check compares against, so the check needs no
//! knowledge of how nft or legacy print a rule.

use std::net::IpAddr;

use super::iptables::{RulesError, Tables};
use super::rules::{self, Family, Ours, TABLES};

/// What localdns's chains looked like right after install, per family and table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(Vec<(Family, &'static str, Ours)>);

fn read(t: &dyn Tables, family: Family, table: &str) -> Result<Ours, RulesError> {
    Ok(t.save(family, table)?
        .map(|text| rules::parse(&text, table))
        .unwrap_or_default())
}

fn read_all(t: &dyn Tables) -> Result<Snapshot, RulesError> {
    read_in(t, &TABLES)
}

fn read_in(t: &dyn Tables, tables: &[&'static str]) -> Result<Snapshot, RulesError> {
    let mut all = Vec::new();
    for family in Family::ALL {
        for &table in tables {
            all.push((family, table, read(t, family, table)?));
        }
    }
    Ok(Snapshot(all))
}

/// Makes the backend hold exactly localdns's rules for `addresses` (a family without
/// addresses holds none) and returns what it then holds. Another agent changing the
/// rules between the write and the read-back is caught by [`complete`] and the install
/// is repeated.
pub fn install(t: &dyn Tables, addresses: &[IpAddr], port: u16) -> Result<Snapshot, RulesError> {
    install_in(t, addresses, port, &TABLES)
}

/// [`install`] limited to `tables` (the nftables backend's ACCEPT rules: `filter` only).
pub fn install_in(
    t: &dyn Tables,
    addresses: &[IpAddr],
    port: u16,
    tables: &[&'static str],
) -> Result<Snapshot, RulesError> {
    for _ in 0..3 {
        write(t, addresses, port, tables)?;
        let snapshot = read_in(t, tables)?;
        if complete(&snapshot, addresses, port) {
            return Ok(snapshot);
        }
    }
    Err(RulesError::Unstable)
}

/// The rules as the backend holds them now, when they are complete for `addresses`
/// (installed by `localdns setup` a moment ago); otherwise installs them. What a daemon
/// whose ExecStartPre already installed the rules starts its drift check from.
pub fn adopt(t: &dyn Tables, addresses: &[IpAddr], port: u16) -> Result<Snapshot, RulesError> {
    let snapshot = read_all(t)?;
    if complete(&snapshot, addresses, port) {
        return Ok(snapshot);
    }
    install(t, addresses, port)
}

/// Whether `snapshot` holds every chain, rule and jump wanted for `addresses` (and
/// nothing of localdns's in a family without addresses).
pub fn complete(snapshot: &Snapshot, addresses: &[IpAddr], port: u16) -> bool {
    snapshot.0.iter().all(|(family, table, ours)| {
        let hooks = rules::HOOKS.iter().filter(|h| h.table == *table);
        if !addresses.iter().any(|ip| Family::of(ip) == *family) {
            return ours.is_empty();
        }
        hooks.into_iter().all(|h| {
            let jumps = ours
                .jumps
                .iter()
                .filter(|l| {
                    l.starts_with(&format!("-A {} ", h.builtin))
                        && l.ends_with(&format!("-j {}", h.chain))
                })
                .count();
            let prefix = format!("-A {} ", h.chain);
            let rules = ours.rules.iter().filter(|l| l.starts_with(&prefix)).count();
            jumps == 1
                && ours.chains.iter().any(|c| c == h.chain)
                && rules == rules::chain_rules(h, *family, addresses, port).len()
        })
    })
}

fn write(
    t: &dyn Tables,
    addresses: &[IpAddr],
    port: u16,
    tables: &[&'static str],
) -> Result<(), RulesError> {
    for family in Family::ALL {
        let wanted = addresses.iter().any(|ip| Family::of(ip) == family);
        let mut input = String::new();
        for &table in tables {
            let now = read(t, family, table)?;
            if wanted {
                let rules = |h: &rules::Hook| rules::chain_rules(h, family, addresses, port);
                input.push_str(&rules::install_input(table, &now, &rules));
            } else if let Some(remove) = rules::remove_input(table, &now) {
                input.push_str(&remove);
            }
        }
        if !input.is_empty() {
            t.restore(family, &input)?;
        }
    }
    Ok(())
}

/// Whether the backend still holds exactly `snapshot`.
pub fn intact(t: &dyn Tables, snapshot: &Snapshot) -> Result<bool, RulesError> {
    let tables: Vec<&'static str> = TABLES
        .into_iter()
        .filter(|t| snapshot.0.iter().any(|(_, s, _)| s == t))
        .collect();
    Ok(read_in(t, &tables)? == *snapshot)
}

/// Removes every `LOCALDNS-*` chain and every jump to one. `Ok(true)` when there was
/// something to remove.
pub fn remove(t: &dyn Tables) -> Result<bool, RulesError> {
    remove_in(t, &TABLES)
}

/// [`remove`] limited to `tables`.
pub fn remove_in(t: &dyn Tables, tables: &[&'static str]) -> Result<bool, RulesError> {
    let mut removed = false;
    for family in Family::ALL {
        let mut input = String::new();
        for &table in tables {
            if let Some(remove) = rules::remove_input(table, &read(t, family, table)?) {
                input.push_str(&remove);
            }
        }
        if !input.is_empty() {
            t.restore(family, &input)?;
            removed = true;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::iptables::Kind;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A fake backend that records restores and serves scripted save output.
    #[derive(Default)]
    struct Fake {
        saved: Mutex<HashMap<(Family, String), String>>,
        restored: Mutex<Vec<(Family, String)>>,
    }

    impl Tables for Fake {
        fn kind(&self) -> Kind {
            Kind::Nft
        }
        fn save(&self, family: Family, table: &str) -> Result<Option<String>, RulesError> {
            Ok(self
                .saved
                .lock()
                .unwrap()
                .get(&(family, table.to_owned()))
                .cloned())
        }
        fn restore(&self, family: Family, input: &str) -> Result<(), RulesError> {
            self.restored
                .lock()
                .unwrap()
                .push((family, input.to_owned()));
            Ok(())
        }
    }

    #[test]
    fn install_writes_one_input_per_family_with_addresses() {
        let fake = Fake::default();
        let addrs: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap()];
        write(&fake, &addrs, 53, &TABLES).unwrap();
        let restored = fake.restored.lock().unwrap();
        assert_eq!(restored.len(), 1, "no IPv6 address: IPv6 untouched");
        let (family, input) = &restored[0];
        assert_eq!(*family, Family::V4);
        assert!(input.starts_with("*raw\n:LOCALDNS-PREROUTING - [0:0]\n"));
        assert!(input.contains("COMMIT\n*filter\n:LOCALDNS-INPUT - [0:0]\n"));
        assert_eq!(input.matches("-I ").count(), 4);
    }

    #[test]
    fn a_family_without_addresses_loses_its_old_rules() {
        let fake = Fake::default();
        fake.saved.lock().unwrap().insert(
            (Family::V6, "filter".into()),
            "*filter\n:LOCALDNS-INPUT - [0:0]\n-A INPUT -j LOCALDNS-INPUT\nCOMMIT\n".into(),
        );
        write(&fake, &["10.96.0.10".parse().unwrap()], 53, &TABLES).unwrap();
        let restored = fake.restored.lock().unwrap();
        assert_eq!(restored[1].0, Family::V6);
        assert_eq!(
            restored[1].1,
            "*filter\n-D INPUT -j LOCALDNS-INPUT\n-F LOCALDNS-INPUT\n-X LOCALDNS-INPUT\nCOMMIT\n"
        );
    }

    #[test]
    fn drift_is_any_difference_from_the_snapshot() {
        let fake = Fake::default();
        let key = (Family::V4, "raw".to_owned());
        let text = "*raw\n:LOCALDNS-OUTPUT - [0:0]\n-A OUTPUT -j LOCALDNS-OUTPUT\n-A LOCALDNS-OUTPUT -j NOTRACK\nCOMMIT\n";
        fake.saved.lock().unwrap().insert(key.clone(), text.into());
        let snap = read_all(&fake).unwrap();
        assert!(intact(&fake, &snap).unwrap());
        // Someone else's rule does not matter.
        fake.saved.lock().unwrap().insert(
            key.clone(),
            text.replace("COMMIT", "-A OUTPUT -j ACCEPT\nCOMMIT"),
        );
        assert!(intact(&fake, &snap).unwrap());
        // A flushed chain does.
        fake.saved
            .lock()
            .unwrap()
            .insert(key, text.replace("-A LOCALDNS-OUTPUT -j NOTRACK\n", ""));
        assert!(!intact(&fake, &snap).unwrap());
    }

    #[test]
    fn complete_means_every_chain_jump_and_rule() {
        let addrs: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap()];
        // What install writes, as a save output would show it.
        let mut saved = String::new();
        for table in TABLES {
            let input = rules::install_input(table, &Ours::default(), &|h| {
                rules::chain_rules(h, Family::V4, &addrs, 53)
            });
            saved.push_str(
                &input
                    .replace("-I OUTPUT 1 ", "-A OUTPUT ")
                    .replace("-I PREROUTING 1 ", "-A PREROUTING ")
                    .replace("-I INPUT 1 ", "-A INPUT "),
            );
        }
        let snap = |text: &str| {
            Snapshot(
                Family::ALL
                    .iter()
                    .flat_map(|&f| {
                        TABLES.map(|t| {
                            (
                                f,
                                t,
                                if f == Family::V4 {
                                    rules::parse(text, t)
                                } else {
                                    Ours::default()
                                },
                            )
                        })
                    })
                    .collect(),
            )
        };
        assert!(complete(&snap(&saved), &addrs, 53));
        let no_jump = saved.replace(
            "-A INPUT -m comment --comment localdns -j LOCALDNS-INPUT\n",
            "",
        );
        assert!(!complete(&snap(&no_jump), &addrs, 53));
        let one_rule_less = saved.replacen("-A LOCALDNS-OUTPUT -d", "-A NOT-OURS -d", 1);
        assert!(!complete(&snap(&one_rule_less), &addrs, 53));
        assert!(!complete(
            &snap(&saved),
            &["10.96.0.10".parse().unwrap(), "10.96.0.11".parse().unwrap()],
            53
        ));
    }

    #[test]
    fn remove_touches_nothing_when_nothing_is_ours() {
        let fake = Fake::default();
        fake.saved.lock().unwrap().insert(
            (Family::V4, "filter".into()),
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n".into(),
        );
        assert!(!remove(&fake).unwrap());
        assert!(fake.restored.lock().unwrap().is_empty());
    }
}
