//! Installing, checking and removing localdns's rules over a [`Tables`] backend.
//!
//! Install writes one `iptables-restore --noflush` input per family (raw and filter
//! together), then reads back what the kernel holds: that [`Snapshot`], in the backend's
//! own canonical form, is what the drift check compares against, so the check needs no
//! knowledge of how nft or legacy print a rule.

use std::net::IpAddr;

use super::iptables::{Kind, RulesError, Tables};
use super::order;
use super::rules::{self, Family, Ours, TABLES};

/// What localdns's chains looked like right after install, per family and table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(Vec<(Family, &'static str, Ours)>);

/// One table's save output (empty when there is no such table) and localdns's part of it.
fn read_text(t: &dyn Tables, family: Family, table: &str) -> Result<(String, Ours), RulesError> {
    let text = t.save(family, table)?.unwrap_or_default();
    let ours = rules::parse(&text, table);
    Ok((text, ours))
}

fn read(t: &dyn Tables, family: Family, table: &str) -> Result<Ours, RulesError> {
    Ok(read_text(t, family, table)?.1)
}

/// Foreign rules ahead of one of localdns's jumps that may change what happens to DNS
/// to its addresses (see [`order`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ahead {
    pub kind: Kind,
    pub family: Family,
    pub table: &'static str,
    pub builtin: &'static str,
    /// Our jump, as the save output shows it.
    pub jump: String,
    /// The rules ahead of it that count, in chain order.
    pub rules: Vec<String>,
}

impl Ahead {
    /// Where: `iptables-nft raw PREROUTING`.
    pub fn place(&self) -> String {
        format!(
            "{}-{} {} {}",
            self.family.command(),
            self.kind.name(),
            self.table,
            self.builtin
        )
    }

    /// The first rule ahead, with how many more there are.
    pub fn rule(&self) -> String {
        let first = self.rules.first().map_or("", String::as_str);
        match self.rules.len() {
            0 | 1 => first.to_owned(),
            n => format!("{first} (and {} more)", n - 1),
        }
    }
}

/// What the drift check found: whether localdns's chains, rules and jumps are as in the
/// snapshot, and which jumps have a foreign rule ahead that counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub intact: bool,
    pub ahead: Vec<Ahead>,
}

/// The tables `snapshot` covers.
fn tables_of(snapshot: &Snapshot) -> Vec<&'static str> {
    TABLES
        .into_iter()
        .filter(|t| snapshot.0.iter().any(|(_, s, _)| s == t))
        .collect()
}

/// Compares the backend with `snapshot` and finds the jumps that are not first where it
/// matters, reading each table once.
pub fn check(
    t: &dyn Tables,
    snapshot: &Snapshot,
    addresses: &[IpAddr],
    port: u16,
) -> Result<Check, RulesError> {
    check_in(t, snapshot, None, addresses, port)
}

/// [`check`] of the tables `only` names (`None`: all): what an event named. The others
/// are taken to be as they were.
pub fn check_in(
    t: &dyn Tables,
    snapshot: &Snapshot,
    only: Option<&[(Family, &str)]>,
    addresses: &[IpAddr],
    port: u16,
) -> Result<Check, RulesError> {
    let mut intact = true;
    let mut ahead = Vec::new();
    for (family, table, was) in &snapshot.0 {
        let (family, table) = (*family, *table);
        if only.is_some_and(|o| !o.contains(&(family, table))) {
            continue;
        }
        let (text, ours) = read_text(t, family, table)?;
        for h in rules::HOOKS.iter().filter(|h| h.table == table) {
            let flows = order::flows(h, family, addresses, port);
            let found = order::ahead(&text, h, &flows);
            let jump = ours.jumps.iter().find(|l| rules::is_jump(l, h));
            if let (false, Some(jump)) = (found.is_empty(), jump) {
                ahead.push(Ahead {
                    kind: t.kind(),
                    family,
                    table,
                    builtin: h.builtin,
                    jump: jump.clone(),
                    rules: found,
                });
            }
        }
        intact &= ours == *was;
    }
    Ok(Check { intact, ahead })
}

/// Moves the jumps of `ahead` back to the top of their chains: one restore per family,
/// each table in one commit (the jump is never missing).
pub fn move_first(t: &dyn Tables, ahead: &[Ahead]) -> Result<(), RulesError> {
    for family in Family::ALL {
        let mut input = String::new();
        for table in TABLES {
            let jumps: Vec<&str> = ahead
                .iter()
                .filter(|a| a.family == family && a.table == table)
                .map(|a| a.jump.as_str())
                .collect();
            if !jumps.is_empty() {
                input.push_str(&rules::move_first_input(table, &jumps));
            }
        }
        if !input.is_empty() {
            t.restore(family, &input)?;
        }
    }
    Ok(())
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
            let (text, now) = read_text(t, family, table)?;
            if wanted {
                let rules = |h: &rules::Hook| rules::chain_rules(h, family, addresses, port);
                let buried: Vec<&str> = rules::HOOKS
                    .iter()
                    .filter(|h| h.table == table)
                    .filter(|h| {
                        now.jumps.iter().any(|j| {
                            rules::is_jump(j, h) && !order::is_first(&text, table, h.builtin, j)
                        })
                    })
                    .map(|h| h.builtin)
                    .collect();
                input.push_str(&rules::install_input(table, &now, &rules, &buried));
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
    Ok(read_in(t, &tables_of(snapshot))? == *snapshot)
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
    fn a_foreign_accept_ahead_is_found_and_moved_behind_in_one_commit() {
        let fake = Fake::default();
        let key = (Family::V4, "raw".to_owned());
        let jump = "-A PREROUTING -m comment --comment localdns -j LOCALDNS-PREROUTING";
        let ours = format!(":LOCALDNS-PREROUTING - [0:0]\n{jump}\n-A LOCALDNS-PREROUTING -d 10.96.0.10/32 -j NOTRACK\n");
        let text = format!("*raw\n{ours}COMMIT\n");
        fake.saved.lock().unwrap().insert(key.clone(), text);
        let snap = read_all(&fake).unwrap();
        let addrs: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap()];
        let c = check(&fake, &snap, &addrs, 53).unwrap();
        assert!(c.intact && c.ahead.is_empty(), "{c:?}");
        let accept = "-A PREROUTING -p udp -m udp --dport 53 -j ACCEPT";
        let text = format!("*raw\n{accept}\n{ours}COMMIT\n");
        fake.saved.lock().unwrap().insert(key, text);
        // The text of our rules is the same: only the order says something is wrong.
        assert!(intact(&fake, &snap).unwrap());
        let c = check(&fake, &snap, &addrs, 53).unwrap();
        assert!(c.intact);
        assert_eq!(c.ahead.len(), 1);
        assert_eq!(c.ahead[0].rule(), accept);
        assert_eq!(c.ahead[0].place(), "iptables-nft raw PREROUTING");
        move_first(&fake, &c.ahead).unwrap();
        assert_eq!(
            fake.restored.lock().unwrap().as_slice(),
            [(
                Family::V4,
                "*raw\n\
                 -D PREROUTING -m comment --comment localdns -j LOCALDNS-PREROUTING\n\
                 -I PREROUTING 1 -m comment --comment localdns -j LOCALDNS-PREROUTING\n\
                 COMMIT\n"
                    .to_owned()
            )]
        );
        // An install moves it to the top as well.
        fake.restored.lock().unwrap().clear();
        write(&fake, &addrs, 53, &["raw"]).unwrap();
        let restored = fake.restored.lock().unwrap();
        assert!(
            restored[0]
                .1
                .contains(&format!("-D {}\n-I PREROUTING 1 ", &jump[3..])),
            "{restored:?}"
        );
    }

    #[test]
    fn an_event_check_reads_only_the_tables_it_names() {
        let fake = Fake::default();
        let raw = (Family::V4, "raw".to_owned());
        let text = "*raw\n:LOCALDNS-OUTPUT - [0:0]\n-A OUTPUT -j LOCALDNS-OUTPUT\n-A LOCALDNS-OUTPUT -j NOTRACK\nCOMMIT\n";
        fake.saved.lock().unwrap().insert(raw.clone(), text.into());
        let snap = read_all(&fake).unwrap();
        fake.saved
            .lock()
            .unwrap()
            .insert(raw, text.replace("-A LOCALDNS-OUTPUT -j NOTRACK\n", ""));
        let addrs: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap()];
        let only = |o: &[(Family, &str)]| check_in(&fake, &snap, Some(o), &addrs, 53).unwrap();
        assert!(only(&[(Family::V4, "filter"), (Family::V6, "raw")]).intact);
        assert!(!only(&[(Family::V4, "raw")]).intact);
        assert!(!check(&fake, &snap, &addrs, 53).unwrap().intact);
    }

    #[test]
    fn complete_means_every_chain_jump_and_rule() {
        let addrs: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap()];
        // What install writes, as a save output would show it.
        let mut saved = String::new();
        for table in TABLES {
            let input = rules::install_input(
                table,
                &Ours::default(),
                &|h| rules::chain_rules(h, Family::V4, &addrs, 53),
                &[],
            );
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
