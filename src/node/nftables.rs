//! The native nftables backend: localdns's own table, `inet localdns`, for IPv4 and IPv6
//! together, written in one transaction.
//!
//! The table is built here as data, in the typed JSON schema of the `nftables` crate, and
//! handed to `nft -j -f -` (run by [`super::nft::run`], bounded in time): nft applies the
//! whole document in one netlink transaction, so the kernel holds either the old table or
//! the new one, never a half-written one and never none. The document adds the table,
//! deletes it and adds it again with its chains and rules, which replaces whatever was
//! there (an older version's rules, a hand edit) atomically, and works whether or not the
//! table existed. No shell command is ever built from strings.
//!
//! Why the `nftables` crate (JSON through the `nft` tool) rather than netlink bindings:
//! `rustables` is GPL-3.0, which our Apache-2.0 package cannot take; `nftnl` wraps the C
//! libraries libnftnl and libmnl, which would have to be present at build and run time
//! (the glibc-2.28 zigbuild in `packaging/build` links nothing of the kind), and their
//! expression API is a thin layer over the kernel's registers. `nft` is on every node
//! whose firewall is nftables (Debian 11+, RHEL 8+), the package depends on it, and nft's
//! JSON is a stable, documented interface (libnftables-json(5)).
//!
//! The semantics are those of the iptables rules ([`super::rules`]):
//! - chain `prerouting` (hook prerouting, priority raw = -300, before conntrack at -200),
//!   per address, two rules that together are iptables' `-m socket` (without
//!   `--nowildcard`): "a socket would receive this packet, not counting a full socket
//!   bound to the wildcard address":
//!   - `ip daddr IP meta l4proto { tcp, udp } th dport 53 socket wildcard 1 return`: the
//!     only socket found is bound to 0.0.0.0 or :: (another daemon's): leave the packet
//!     to conntrack and kube-proxy;
//!   - `ip daddr IP meta l4proto { tcp, udp } th dport 53 socket transparent 0 notrack`:
//!     any other socket found (the `socket` expression fails, and the rule with it,
//!     when none is): skip conntrack.
//!
//!   While localdns is dead no socket is found, the query is tracked and kube-proxy
//!   DNATs it to kube-dns: fail-open. nft has no bare "a socket exists" match, and
//!   `socket wildcard 0` alone is not enough: the `wildcard` key fails on sockets that are
//!   not full sockets, such as a TCP connection between SYN and handshake (a request
//!   socket) or in TIME_WAIT, so the ACK of every new TCP connection would be tracked,
//!   and DNATed to kube-dns on the Service IP. `transparent` is read from every kind of
//!   socket (localdns never sets IP_TRANSPARENT).
//! - chain `output` (hook output, priority raw): queries from the node itself, and
//!   localdns's answers, skip conntrack unconditionally (the `socket` expression is
//!   not useful on output: the packet's own socket is the sender's).
//!
//! No ACCEPT rules live here: in nftables an accept in one table does not stop a drop in
//! another table's chain on the same hook. Where the node's iptables filter table drops
//! by default, the ACCEPT rules go there (see [`super::backend`]).

use std::borrow::Cow;
use std::net::IpAddr;

use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem};
use nftables::expr::{Socket, SocketAttr};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::nft::{self, NftError};
use super::rules::TAG;

/// The table's name (family `inet`).
pub const TABLE: &str = "localdns";
/// `family name`, as `nft list tables` and docs/design.md show it.
pub const TABLE_ID: &str = "inet localdns";
/// iptables' raw priority: before conntrack (-200).
///
/// Why rule order cannot bypass this table the way it bypasses the iptables backends
/// (see [`super::order`]): every base chain on a hook is run, in priority order, and an
/// `accept` ends only the chain it is in. A foreign `accept` at priority -300 or before
/// (iptables-nft's own raw table sits at -300 too, in an order between the two chains
/// that nobody fixes) does not stop this chain's `notrack`, and conntrack at -200 comes
/// after all of them; kube-proxy's nftables mode DNATs at dstnat (-100), too late to
/// matter for an untracked packet. Only a `drop` (final in any chain) or a chain that
/// rewrites the packet before ours can change what happens to DNS to our addresses,
/// and moving would not help against either. So there is no order check here.
const RAW: i32 = -300;

/// localdns's table as nft lists it (handles dropped): what the drift check compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing(Vec<NfListObject<'static>>);

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

fn chain(name: &'static str, hook: NfHook) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        newname: None,
        handle: None,
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(RAW),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }
}

pub(crate) fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

pub(crate) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

/// `ip daddr IP` / `ip6 saddr IP`.
pub(crate) fn address(ip: &IpAddr, field: &'static str) -> Statement<'static> {
    let protocol = if ip.is_ipv4() { "ip" } else { "ip6" };
    is(
        payload(protocol, field),
        Expression::String(ip.to_string().into()),
    )
}

/// `meta l4proto { tcp, udp }`.
pub(crate) fn tcp_or_udp() -> Statement<'static> {
    is(
        Expression::Named(NamedExpression::Meta(Meta {
            key: MetaKey::L4proto,
        })),
        Expression::Named(NamedExpression::Set(vec![
            SetItem::Element(Expression::String("tcp".into())),
            SetItem::Element(Expression::String("udp".into())),
        ])),
    )
}

/// `th dport PORT` / `th sport PORT`.
pub(crate) fn port(field: &'static str, port: u16) -> Statement<'static> {
    is(payload("th", field), Expression::Number(port.into()))
}

/// `socket KEY VALUE`.
fn socket(key: SocketAttr, value: u32) -> Statement<'static> {
    is(
        Expression::Named(NamedExpression::Socket(Socket {
            key: Cow::Owned(key),
        })),
        Expression::Number(value),
    )
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>, comment: String) -> Rule<'static> {
    Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: chain.into(),
        expr: expr.into(),
        handle: None,
        index: None,
        comment: Some(comment.into()),
    }
}

/// The chains and rules of the table for `addresses` on `port`.
pub fn contents(addresses: &[IpAddr], port_: u16) -> Vec<NfListObject<'static>> {
    // DNS packets to `ip` on `port_` (or from it, with the fields "saddr" and "sport"),
    // then `tail`.
    let dns = |chain: &'static str,
               ip: &IpAddr,
               (addr, port_field): (&'static str, &'static str),
               tail: Vec<Statement<'static>>,
               why: String| {
        let mut expr = vec![address(ip, addr), tcp_or_udp(), port(port_field, port_)];
        expr.extend(tail);
        NfListObject::Rule(rule(chain, expr, format!("{TAG}: {why}")))
    };
    let mut out = vec![
        NfListObject::Chain(chain("prerouting", NfHook::Prerouting)),
        NfListObject::Chain(chain("output", NfHook::Output)),
    ];
    for ip in addresses {
        out.push(dns(
            "prerouting",
            ip,
            ("daddr", "dport"),
            vec![socket(SocketAttr::Wildcard, 1), Statement::Return(None)],
            format!("DNS to {ip} is left to conntrack while only a wildcard socket listens"),
        ));
        out.push(dns(
            "prerouting",
            ip,
            ("daddr", "dport"),
            vec![socket(SocketAttr::Transparent, 0), Statement::Notrack],
            format!("DNS to {ip} skips conntrack while a socket listens"),
        ));
    }
    for ip in addresses {
        out.push(dns(
            "output",
            ip,
            ("daddr", "dport"),
            vec![Statement::Notrack],
            format!("DNS from the node to {ip} skips conntrack"),
        ));
        out.push(dns(
            "output",
            ip,
            ("saddr", "sport"),
            vec![Statement::Notrack],
            format!("answers from {ip} skip conntrack"),
        ));
    }
    out
}

/// The one transaction that makes the kernel hold exactly the table for `addresses`:
/// add the table (so that the delete cannot fail), delete it, add it with its contents.
pub fn transaction(addresses: &[IpAddr], port: u16) -> Nftables<'static> {
    let mut objects = vec![
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
    ];
    objects.extend(
        contents(addresses, port)
            .into_iter()
            .map(|o| NfObject::CmdObject(NfCmd::Add(o))),
    );
    Nftables {
        objects: objects.into(),
    }
}

/// `transaction` as the JSON document `nft -j -f -` reads. The crate writes the
/// `notrack` statement as the string `"notrack"`, which nft 1.0.6 (Debian 12) refuses
/// ("expected object"); every nft reads `{"notrack": null}`, the form it lists itself.
pub fn document(transaction: &Nftables) -> Result<String, serde_json::Error> {
    let mut json = serde_json::to_value(transaction)?;
    if let Some(objects) = json.get_mut("nftables").and_then(|o| o.as_array_mut()) {
        for o in objects {
            let expr = o
                .as_object_mut()
                .and_then(|cmd| cmd.values_mut().next())
                .and_then(|obj| obj.get_mut("rule"))
                .and_then(|rule| rule.get_mut("expr"))
                .and_then(|e| e.as_array_mut());
            for stmt in expr.into_iter().flatten() {
                if stmt.as_str() == Some("notrack") {
                    *stmt = serde_json::json!({ "notrack": null });
                }
            }
        }
    }
    serde_json::to_string(&json)
}

/// The table from `nft -j list table` output, without handles and nft's metainfo.
pub fn parse_listing(json: &str) -> Result<Listing, NftError> {
    let parsed: Nftables<'static> = serde_json::from_str(json).map_err(|e| NftError::Failed {
        args: "-j list table inet localdns".into(),
        code: 0,
        stderr: format!("unreadable JSON: {e}"),
    })?;
    let mut objects = Vec::new();
    for o in parsed.objects.iter() {
        let NfObject::ListObject(o) = o else { continue };
        let mut o = o.clone();
        match &mut o {
            NfListObject::MetainfoObject(_) => continue,
            NfListObject::Table(t) => t.handle = None,
            NfListObject::Chain(c) => c.handle = None,
            NfListObject::Rule(r) => r.handle = None,
            _ => {}
        }
        objects.push(o);
    }
    Ok(Listing(objects))
}

/// The table as the kernel holds it now; `None` when there is none.
pub fn current() -> Result<Option<Listing>, NftError> {
    match nft::run(&["-j", "list", "table", "inet", TABLE], None) {
        Ok(json) => parse_listing(&json).map(Some),
        Err(e) if e.is_absent() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the table for `addresses` in one transaction and returns what the kernel then
/// holds.
pub fn install(addresses: &[IpAddr], port: u16) -> Result<Listing, NftError> {
    let json = document(&transaction(addresses, port)).map_err(|e| NftError::Failed {
        args: "-j -f -".into(),
        code: 0,
        stderr: format!("cannot write the JSON document: {e}"),
    })?;
    nft::run(&["-j", "-f", "-"], Some(&json))?;
    current()?.ok_or_else(|| NftError::Failed {
        args: "-j list table inet localdns".into(),
        code: 0,
        stderr: "the table was gone right after it was written".into(),
    })
}

/// Deletes the table. `Ok(true)` when there was one; nothing else is touched.
pub fn remove() -> Result<bool, NftError> {
    match nft::run(&["delete", "table", "inet", TABLE], None) {
        Ok(_) => Ok(true),
        Err(e) if e.is_absent() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a table of kube-proxy's nftables mode is among `tables` (`family name`).
pub fn kube_proxy_table(tables: &[String]) -> Option<&String> {
    tables
        .iter()
        .find(|t| t.split_whitespace().nth(1) == Some("kube-proxy"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn one_transaction_replaces_the_table_with_both_families() {
        let doc = transaction(&ips(&["169.254.20.10", "fd00::a"]), 53);
        let json: serde_json::Value = serde_json::from_str(&document(&doc).unwrap()).unwrap();
        let objects = json["nftables"].as_array().unwrap();
        // add, delete, add: the table is replaced whether or not it existed.
        assert_eq!(
            objects[0],
            serde_json::json!({"add": {"table": {"family": "inet", "name": "localdns"}}})
        );
        assert_eq!(
            objects[1],
            serde_json::json!({"delete": {"table": {"family": "inet", "name": "localdns"}}})
        );
        assert_eq!(objects[2], objects[0]);
        assert_eq!(
            objects[3],
            serde_json::json!({"add": {"chain": {"family": "inet", "table": "localdns",
                "name": "prerouting", "type": "filter", "hook": "prerouting", "prio": -300,
                "policy": "accept"}}})
        );
        assert_eq!(objects[4]["add"]["chain"]["hook"], "output");
        // Per address: two prerouting rules, two output rules.
        let rules: Vec<&serde_json::Value> = objects
            .iter()
            .filter_map(|o| o["add"].get("rule"))
            .collect();
        assert_eq!(rules.len(), 8);
        // A wildcard-bound socket (another daemon's) does not count: return, no notrack.
        assert_eq!(
            rules[0]["expr"][3],
            serde_json::json!({"match": {"op": "==", "left": {"socket": {"key": "wildcard"}}, "right": 1}})
        );
        assert_eq!(rules[0]["expr"][4], serde_json::json!({"return": null}));
        // Then the notrack rule, after the return.
        let rules = &rules[1..];
        assert_eq!(
            rules[0],
            &serde_json::json!({"family": "inet", "table": "localdns", "chain": "prerouting",
            "comment": "localdns: DNS to 169.254.20.10 skips conntrack while a socket listens",
            "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "169.254.20.10"}},
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}},
                {"match": {"op": "==", "left": {"socket": {"key": "transparent"}}, "right": 0}},
                {"notrack": null}
            ]})
        );
        assert_eq!(
            rules[2]["expr"][0]["match"]["left"]["payload"]["protocol"],
            "ip6"
        );
        assert_eq!(rules[2]["expr"][0]["match"]["right"], "fd00::a");
        // Output: no socket match (unconditional), queries and answers.
        let rules = &rules[3..];
        assert_eq!(rules.len(), 4);
        for r in rules {
            assert_eq!(r["chain"], "output");
            assert!(!r.to_string().contains("socket"), "{r}");
            assert!(r.to_string().contains("notrack"), "{r}");
        }
        assert_eq!(
            rules[1]["expr"][0]["match"]["left"]["payload"]["field"],
            "saddr"
        );
        assert_eq!(
            rules[1]["expr"][2]["match"]["left"]["payload"]["field"],
            "sport"
        );
        // Nothing but localdns's own table is named.
        assert!(!json.to_string().contains("\"filter\":"));
        assert!(objects.iter().all(|o| {
            let s = o.to_string();
            s.contains("\"localdns\"")
        }));
    }

    #[test]
    fn listing_drops_handles_and_metainfo() {
        let listing = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "localdns", "handle": 7}}, {"chain": {"family": "inet", "table": "localdns", "name": "output", "handle": 2, "type": "filter", "hook": "output", "prio": -300, "policy": "accept"}}, {"rule": {"family": "inet", "table": "localdns", "chain": "output", "handle": 4, "comment": "x", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.96.0.10"}}, {"notrack": null}]}}]}"#;
        let a = parse_listing(listing).unwrap();
        let b = parse_listing(&listing.replace("\"handle\": 4", "\"handle\": 9")).unwrap();
        assert_eq!(a, b, "handles do not count");
        assert_eq!(a.0.len(), 3);
        let c = parse_listing(&listing.replace("10.96.0.10", "10.96.0.11")).unwrap();
        assert_ne!(a, c);
        assert!(parse_listing("not json").is_err());
    }

    #[test]
    fn kube_proxy_tables_are_found_by_name() {
        let t = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            kube_proxy_table(&t(&["ip filter", "ip kube-proxy"])),
            Some(&"ip kube-proxy".to_string())
        );
        assert!(kube_proxy_table(&t(&["ip filter", "inet localdns"])).is_none());
    }
}
