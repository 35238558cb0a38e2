//! nftables change notifications: a netlink socket (`NETLINK_NETFILTER`) in the
//! multicast group `NFNLGRP_NFTABLES`, to which the kernel reports every table, chain,
//! rule and set that is added or deleted, by anyone (`nft`, iptables-nft, kube-proxy).
//!
//! The messages are not decoded beyond what says whether they concern the tables that
//! hold localdns's rules: the nfgenmsg family and the table-name attribute, which is
//! attribute 1 in every nf_tables object message (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`,
//! `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`, ...). What changed is then found by reading the
//! table again. A message that cannot be read, and a lost batch (the socket's buffer
//! overran), count as a change: a needless check costs one `nft list`, a missed one a
//! drift that lasts until the periodic check.

mod prefilter;

use futures_util::FutureExt;
use netlink_sys::{protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, TokioSocket};

/// `NFNLGRP_NFTABLES` (linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;
/// `NFNL_SUBSYS_NFTABLES`: the high byte of the message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_NEWGEN`, `NFT_MSG_GETGEN`: end of a transaction, no table named.
const NFT_MSG_NEWGEN: u16 = 16;
const NFT_MSG_GETGEN: u16 = 17;
/// nfgenmsg families (`NFPROTO_*`).
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;
const NLMSG_HDRLEN: usize = 16;

/// The iptables family of an nfgenmsg family (`None`: not an iptables one).
pub fn family(nfproto: u8) -> Option<super::rules::Family> {
    match nfproto {
        NFPROTO_IPV4 => Some(super::rules::Family::V4),
        NFPROTO_IPV6 => Some(super::rules::Family::V6),
        _ => None,
    }
}
const NFGENMSG_LEN: usize = 4;

/// What a batch of notifications named, of the tables watched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    /// Something could not be read, or notifications were lost: any table may have changed.
    pub unknown: bool,
    /// The watched `(family, table)` pairs named, each once.
    pub tables: Vec<(u8, &'static str)>,
}

impl Touched {
    pub fn any(&self) -> bool {
        self.unknown || !self.tables.is_empty()
    }

    fn name(&mut self, pair: (u8, &'static str)) {
        if !self.tables.contains(&pair) {
            self.tables.push(pair);
        }
    }
}

/// Adds to `out` what a datagram of notifications names of `watched` (`(family, table)`).
pub fn touched(datagram: &[u8], watched: &[(u8, &'static str)], out: &mut Touched) {
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < NLMSG_HDRLEN || len > rest.len() {
            out.unknown = true;
            return;
        }
        let msg = &rest[NLMSG_HDRLEN..len];
        rest = &rest[align(len).min(rest.len())..];
        if kind >> 8 != NFNL_SUBSYS_NFTABLES {
            continue;
        }
        if matches!(kind & 0xff, NFT_MSG_NEWGEN | NFT_MSG_GETGEN) {
            continue;
        }
        if msg.len() < NFGENMSG_LEN {
            out.unknown = true;
            return;
        }
        let family = msg[0];
        match table_name(&msg[NFGENMSG_LEN..]) {
            Some(name) => {
                if let Some(pair) = watched
                    .iter()
                    .find(|(f, t)| *f == family && t.as_bytes() == name)
                {
                    out.name(*pair);
                }
            }
            None => {
                out.unknown = true;
                return;
            }
        }
    }
}

/// Whether a datagram of notifications touches one of `watched`.
pub fn touches(datagram: &[u8], watched: &[(u8, &'static str)]) -> bool {
    let mut t = Touched::default();
    touched(datagram, watched, &mut t);
    t.any()
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The value of attribute 1 (the table name), without its NUL.
fn table_name(mut attrs: &[u8]) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == 1 {
            let value = &attrs[4..len];
            return Some(value.split(|b| *b == 0).next().unwrap_or(value));
        }
        attrs = &attrs[align(len).min(attrs.len())..];
    }
    None
}

/// Attaches the biggest [`prefilter`] program the kernel takes (see
/// [`prefilter::MESSAGES`]); returns how many messages a datagram it reads.
fn attach(socket: &netlink_sys::Socket, names: &[&str]) -> std::io::Result<usize> {
    let mut messages = prefilter::MESSAGES;
    loop {
        let program = prefilter::program(names, messages).filters();
        match socket2::SockRef::from(socket).attach_filter(&program) {
            Ok(()) => return Ok(messages),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOMEM) && messages > 1 => messages /= 2,
            Err(e) => return Err(e),
        }
    }
}

/// The subscribed socket.
pub struct Events(TokioSocket);

impl Events {
    /// Joins `NFNLGRP_NFTABLES` in this network namespace (needs CAP_NET_ADMIN), with
    /// the kernel dropping what certainly does not concern `watched` ([`prefilter`]).
    pub fn subscribe(watched: &[(u8, &'static str)]) -> std::io::Result<Events> {
        let mut socket = TokioSocket::new(NETLINK_NETFILTER)?;
        let names: Vec<&str> = watched.iter().map(|(_, t)| *t).collect();
        // Before joining the group: no datagram is queued unfiltered. Without it (a kernel
        // that refuses the program) every datagram is read and decided here, as before.
        match attach(socket.socket_ref(), &names) {
            Ok(messages) => tracing::debug!(
                "nftables notification prefilter attached (up to {messages} messages a datagram)"
            ),
            Err(e) => tracing::warn!(
                "cannot attach the nftables notification prefilter: {e}; every notification is read"
            ),
        }
        socket.socket_mut().bind_auto()?;
        socket.socket_mut().add_membership(NFNLGRP_NFTABLES)?;
        // kube-proxy rewrites big tables: room for a burst.
        let _ = socket.socket_ref().set_rx_buf_sz(1 << 20);
        Ok(Events(socket))
    }

    /// Waits until a notification touches `watched` (or some were lost), and says which
    /// tables; the ones already queued behind it are taken too. An error means the socket
    /// is unusable.
    pub async fn changed(&mut self, watched: &[(u8, &'static str)]) -> std::io::Result<Touched> {
        let mut out = Touched::default();
        loop {
            match self.0.recv_from_full().await {
                Ok((datagram, _)) => touched(&datagram, watched, &mut out),
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => out.unknown = true,
                Err(e) => return Err(e),
            }
            while let Some(next) = self.0.recv_from_full().now_or_never() {
                match next {
                    Ok((datagram, _)) => touched(&datagram, watched, &mut out),
                    Err(_) => out.unknown = true,
                }
            }
            if out.any() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One nf_tables notification: header, nfgenmsg, attributes.
    pub(super) fn message(msg: u16, family: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for (kind, value) in attrs {
            let len = 4 + value.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(value);
            body.resize(align(body.len()), 0);
        }
        let len = NLMSG_HDRLEN + body.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&body);
        out
    }

    const OURS: &[(u8, &str)] = &[(NFPROTO_INET, "localdns")];

    #[test]
    fn a_change_to_our_table_is_seen_and_others_are_not() {
        // NFT_MSG_DELTABLE inet localdns (what `nft delete table` and `flush ruleset` send).
        let del = message(2, NFPROTO_INET, &[(1, b"localdns\0"), (3, &[0; 8])]);
        assert!(touches(&del, OURS));
        // A rule in kube-proxy's table (attribute 1 with the NLA_F_NET_BYTEORDER bit is
        // still attribute 1).
        let kube = message(
            6,
            NFPROTO_IPV4,
            &[(1 | 0x4000, b"kube-proxy\0"), (2, b"x\0")],
        );
        assert!(!touches(&kube, OURS));
        // Same name, another family.
        assert!(!touches(
            &message(0, NFPROTO_IPV4, &[(1, b"localdns\0")]),
            OURS
        ));
        // The end of a transaction names no table.
        assert!(!touches(
            &message(NFT_MSG_NEWGEN, 0, &[(1, &[0, 0, 0, 7])]),
            OURS
        ));
        // Several messages in one datagram: any one of ours counts.
        let both = [kube.clone(), del].concat();
        assert!(touches(&both, OURS));
        assert!(!touches(&[kube.clone(), kube].concat(), OURS));
    }

    #[test]
    fn the_tables_named_are_said_each_once() {
        let watched = &[
            (NFPROTO_IPV4, "raw"),
            (NFPROTO_IPV4, "filter"),
            (NFPROTO_IPV6, "filter"),
        ];
        let rule = |family, table: &[u8]| message(6, family, &[(1, table), (2, b"x\0")]);
        let d = [
            rule(NFPROTO_IPV4, b"filter\0"),
            rule(NFPROTO_IPV4, b"nat\0"),
            rule(NFPROTO_IPV4, b"filter\0"),
            rule(NFPROTO_IPV6, b"filter\0"),
        ]
        .concat();
        let mut t = Touched::default();
        touched(&d, watched, &mut t);
        assert_eq!(
            t,
            Touched {
                unknown: false,
                tables: vec![(NFPROTO_IPV4, "filter"), (NFPROTO_IPV6, "filter")]
            }
        );
        // Batches add up.
        touched(&rule(NFPROTO_IPV4, b"raw\0"), watched, &mut t);
        assert_eq!(t.tables.len(), 3);
        let mut t = Touched::default();
        touched(&rule(NFPROTO_IPV6, b"nat\0"), watched, &mut t);
        assert!(!t.any());
    }

    #[test]
    fn what_cannot_be_read_counts_as_a_change() {
        let mut short = message(6, NFPROTO_INET, &[(1, b"localdns\0")]);
        short[0] = 200; // longer than the datagram
        assert!(touches(&short, OURS));
        // A rule message without a table name.
        assert!(touches(&message(6, NFPROTO_INET, &[(2, b"x\0")]), OURS));
        assert!(!touches(&[], OURS));
    }
}
