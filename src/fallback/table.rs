//! The relay's nftables table, `ip localdns-fallback`, as data: DNAT of DNS to the relayed
//! link-local addresses to the relay's own address, in nat chains that run before every
//! other NAT on the hook.
//!
//! The DNAT never sees a query localdns takes: localdns's raw rules (priority -300, before
//! conntrack) NOTRACK every query a localdns socket would receive, and untracked packets
//! skip NAT. What reaches these chains is what no localdns socket takes (stopped, killed
//! with its kept sockets given back, failing to start): that goes to the relay.
//!
//! Priority -110, before `dstnat` (-100) where iptables' nat table and kube-proxy's
//! nftables table sit: the kernel's NAT core runs the nat chains of a hook in priority
//! order and stops at the first that binds the connection, so these rules win for the
//! relayed addresses only and every other packet goes on to kube-proxy untouched. The
//! port stays: the relay listens on the relayed port of its own address.
//!
//! A table of its own, not a chain in `inet localdns`: localdns's teardown deletes that
//! table at a stop, which is exactly when this one must stay.

use std::net::{IpAddr, Ipv4Addr};

use nftables::expr::Expression;
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::node::nft::{self, NftError};
use crate::node::nftables::{address, port, tcp_or_udp};
use crate::node::rules::TAG;

/// The table's name (family `ip`).
pub const TABLE: &str = "localdns-fallback";
/// `family name`, as `nft list tables` shows it.
pub const TABLE_ID: &str = "ip localdns-fallback";
/// Before `dstnat` (-100): first among the nat chains of the hook.
const PRIORITY: i32 = -110;

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: TABLE.into(),
        handle: None,
    }
}

fn chain(name: &'static str, hook: NfHook) -> Chain<'static> {
    Chain {
        family: NfFamily::IP,
        table: TABLE.into(),
        name: name.into(),
        newname: None,
        handle: None,
        _type: Some(NfChainType::NAT),
        hook: Some(hook),
        prio: Some(PRIORITY),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }
}

/// The chains and rules: for each relayed address, in `prerouting` (pods) and `output`
/// (the node's own resolver), `ip daddr IP meta l4proto { tcp, udp } th dport PORT dnat to
/// RELAY`.
pub fn contents(relayed: &[Ipv4Addr], dport: u16, relay: Ipv4Addr) -> Vec<NfListObject<'static>> {
    let mut out = vec![
        NfListObject::Chain(chain("prerouting", NfHook::Prerouting)),
        NfListObject::Chain(chain("output", NfHook::Output)),
    ];
    for name in ["prerouting", "output"] {
        for ip in relayed {
            let expr = vec![
                address(&IpAddr::V4(*ip), "daddr"),
                tcp_or_udp(),
                port("dport", dport),
                Statement::DNAT(Some(NAT {
                    addr: Some(Expression::String(relay.to_string().into())),
                    family: None,
                    port: None,
                    flags: None,
                })),
            ];
            out.push(NfListObject::Rule(Rule {
                family: NfFamily::IP,
                table: TABLE.into(),
                chain: name.into(),
                expr: expr.into(),
                handle: None,
                index: None,
                comment: Some(
                    format!("{TAG}: DNS to {ip} that no localdns socket takes goes to the relay")
                        .into(),
                ),
            }));
        }
    }
    out
}

/// One transaction that leaves exactly this table: add (so the delete cannot fail),
/// delete, add with its contents.
pub fn transaction(relayed: &[Ipv4Addr], dport: u16, relay: Ipv4Addr) -> Nftables<'static> {
    let mut objects = vec![
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
        NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
    ];
    objects.extend(
        contents(relayed, dport, relay)
            .into_iter()
            .map(|o| NfObject::CmdObject(NfCmd::Add(o))),
    );
    Nftables {
        objects: objects.into(),
    }
}

/// Writes the table in one transaction.
pub fn install(relayed: &[Ipv4Addr], dport: u16, relay: Ipv4Addr) -> Result<(), NftError> {
    let json = serde_json::to_string(&transaction(relayed, dport, relay)).map_err(|e| {
        NftError::Failed {
            args: "-j -f -".into(),
            code: 0,
            stderr: format!("cannot write the JSON document: {e}"),
        }
    })?;
    nft::run(&["-j", "-f", "-"], Some(&json)).map(drop)
}

/// Whether the table is there now.
pub fn present() -> Result<bool, NftError> {
    match nft::run(&["list", "table", "ip", TABLE], None) {
        Ok(_) => Ok(true),
        Err(e) if e.is_absent() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes the table; `Ok(false)` when there was none. Nothing else is touched.
pub fn remove() -> Result<bool, NftError> {
    match nft::run(&["delete", "table", "ip", TABLE], None) {
        Ok(_) => Ok(true),
        Err(e) if e.is_absent() => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_dnats_each_relayed_address_in_both_hooks_before_dstnat() {
        let relayed = ["169.254.20.10".parse().unwrap()];
        let json =
            serde_json::to_value(transaction(&relayed, 53, "169.254.20.11".parse().unwrap()))
                .unwrap();
        let objects = json["nftables"].as_array().unwrap();
        // add, delete, add table; two chains; one rule per hook.
        assert_eq!(objects.len(), 3 + 2 + 2, "{json}");
        assert!(objects[1]["delete"]["table"]["name"] == TABLE);
        for (i, hook) in [(3, "prerouting"), (4, "output")] {
            let c = &objects[i]["add"]["chain"];
            assert_eq!(c["hook"], hook);
            assert_eq!(c["type"], "nat");
            assert_eq!(c["prio"], -110);
            assert_eq!(c["family"], "ip");
        }
        for i in [5, 6] {
            let r = &objects[i]["add"]["rule"];
            let expr = r["expr"].as_array().unwrap();
            assert_eq!(expr[0]["match"]["right"], "169.254.20.10");
            assert_eq!(expr[2]["match"]["right"], 53);
            assert_eq!(expr[3]["dnat"]["addr"], "169.254.20.11");
            assert!(
                expr[3]["dnat"].get("port").is_none(),
                "the port is kept: {r}"
            );
        }
    }
}
