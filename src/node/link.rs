//! The link that holds the listen addresses, through rtnetlink.
//!
//! The link is created as kind `dummy`; a kernel built without the dummy driver answers
//! "not supported", and then the link is created as `ifb`, which behaves the same for
//! this purpose (it is UP, carries local addresses and sends nothing of its own).
//! Addresses are host routes (/32, /128), IPv6 ones without duplicate address detection
//! so that they can be bound at once. A link of any other kind with the configured name
//! is not localdns's: it is neither used nor removed.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkDummy, LinkIfb, LinkMessageBuilder, LinkUnspec};

/// Kinds localdns creates, in order of preference.
pub const KINDS: [&str; 2] = ["dummy", "ifb"];

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{what} {name}: {source}")]
    Netlink {
        what: &'static str,
        name: String,
        source: rtnetlink::Error,
    },
    #[error("interface {name} exists and is {kind}, not a dummy or ifb link made by localdns: refusing to use or remove it (choose another network.interface)")]
    Foreign { name: String, kind: String },
}

/// A link as far as localdns cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    /// `dummy`, `ifb`, another kind, or "" when the kernel did not say.
    pub kind: String,
    pub up: bool,
    /// Addresses on the link (any prefix length).
    pub addresses: Vec<IpAddr>,
}

/// The link operations [`ensure`] needs; [`Netlink`] is the real one, tests fake it.
pub(crate) trait LinkOps {
    async fn get(&self, name: &str) -> Result<Option<LinkState>, LinkError>;
    /// Creates the link as `kind`; `Ok(false)` when the kernel does not know the kind.
    async fn create(&self, name: &str, kind: &str) -> Result<bool, LinkError>;
    async fn set_up(&self, name: &str, index: u32) -> Result<(), LinkError>;
    async fn add_address(&self, name: &str, index: u32, ip: IpAddr) -> Result<(), LinkError>;
    async fn delete(&self, name: &str, index: u32) -> Result<(), LinkError>;
}

/// What [`ensure`] had to do; all empty when everything was in place.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The kind the link was created as, when it had to be created.
    pub created: Option<&'static str>,
    pub set_up: bool,
    pub added: Vec<IpAddr>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.created.is_none() && !self.set_up && self.added.is_empty()
    }
}

/// Makes the link `name` exist, be up and hold every address of `addresses`.
pub(crate) async fn ensure(
    ops: &impl LinkOps,
    name: &str,
    addresses: &[IpAddr],
) -> Result<Changes, LinkError> {
    let mut changes = Changes::default();
    let state = match ops.get(name).await? {
        Some(s) => s,
        None => {
            let [preferred, fallback] = KINDS;
            if ops.create(name, preferred).await? {
                changes.created = Some(preferred);
            } else {
                tracing::warn!(
                    "this kernel has no {preferred} link type: creating {name} as {fallback} instead"
                );
                if ops.create(name, fallback).await? {
                    changes.created = Some(fallback);
                }
            }
            // A link made by someone else in between is picked up here too.
            ops.get(name).await?.ok_or_else(|| LinkError::Foreign {
                name: name.to_owned(),
                kind: "missing: neither a dummy nor an ifb link could be created".into(),
            })?
        }
    };
    // A physical NIC reports no kind at all: not ours either.
    if !KINDS.contains(&state.kind.as_str()) {
        return Err(foreign(name, &state.kind));
    }
    if !state.up {
        ops.set_up(name, state.index).await?;
        changes.set_up = true;
    }
    for ip in addresses {
        if !state.addresses.contains(ip) {
            ops.add_address(name, state.index, *ip).await?;
            changes.added.push(*ip);
        }
    }
    Ok(changes)
}

fn foreign(name: &str, kind: &str) -> LinkError {
    LinkError::Foreign {
        name: name.to_owned(),
        kind: match kind {
            "" => "a device without a kind (physical or loopback)".to_owned(),
            k => format!("of kind {k}"),
        },
    }
}

/// Could [`ensure`] use the link `name`? Yes when it is absent (it would be created) or
/// ours by kind; the reason when it is another device.
pub(crate) async fn usable(ops: &impl LinkOps, name: &str) -> Result<(), LinkError> {
    match ops.get(name).await? {
        Some(state) if !KINDS.contains(&state.kind.as_str()) => Err(foreign(name, &state.kind)),
        _ => Ok(()),
    }
}

/// Removes the link `name` (and with it its addresses). `Ok(false)` when it was absent.
pub(crate) async fn remove(ops: &impl LinkOps, name: &str) -> Result<bool, LinkError> {
    let Some(state) = ops.get(name).await? else {
        return Ok(false);
    };
    if !KINDS.contains(&state.kind.as_str()) {
        return Err(foreign(name, &state.kind));
    }
    ops.delete(name, state.index).await?;
    Ok(true)
}

/// rtnetlink on a connection driven by a task of the current tokio runtime.
pub struct Netlink {
    handle: Handle,
}

/// `-errno` codes the kernel answers with.
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EOPNOTSUPP: i32 = 95;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

impl Netlink {
    /// Opens the socket; must be called inside a tokio runtime.
    pub fn connect() -> Result<Self, LinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    fn err(what: &'static str, name: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError {
        let name = name.to_owned();
        move |source| LinkError::Netlink { what, name, source }
    }
}

fn kind_of(msg: &LinkMessage) -> String {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(InfoKind::Dummy) => Some("dummy".to_owned()),
                LinkInfo::Kind(InfoKind::Ifb) => Some("ifb".to_owned()),
                LinkInfo::Kind(k) => Some(k.to_string()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_default()
}

impl LinkOps for Netlink {
    async fn get(&self, name: &str) -> Result<Option<LinkState>, LinkError> {
        let found = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await;
        let msg = match found {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => return Ok(None),
            Err(e) => return Err(Self::err("cannot read interface", name)(e)),
        };
        let index = msg.header.index;
        let mut addresses = Vec::new();
        let mut dump = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(a) = dump
            .try_next()
            .await
            .map_err(Self::err("cannot list the addresses of", name))?
        {
            if a.header.index != index {
                continue;
            }
            // IFA_LOCAL is the interface's own address; IPv6 only sends IFA_ADDRESS.
            let local = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            addresses.extend(addr);
        }
        Ok(Some(LinkState {
            index,
            kind: kind_of(&msg),
            up: msg.header.flags.contains(LinkFlags::Up),
            addresses,
        }))
    }

    async fn create(&self, name: &str, kind: &str) -> Result<bool, LinkError> {
        let msg = match kind {
            "dummy" => LinkDummy::new(name).build(),
            _ => LinkIfb::new(name).build(),
        };
        match self.handle.link().add(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(EOPNOTSUPP) => Ok(false),
            // Created by someone else meanwhile: [`ensure`] checks its kind.
            Err(e) if errno(&e) == Some(EEXIST) => Ok(true),
            Err(e) => Err(Self::err("cannot create interface", name)(e)),
        }
    }

    async fn set_up(&self, name: &str, index: u32) -> Result<(), LinkError> {
        let msg = LinkMessageBuilder::<LinkUnspec>::new()
            .index(index)
            .up()
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(Self::err("cannot set up interface", name))
    }

    async fn add_address(&self, name: &str, index: u32, ip: IpAddr) -> Result<(), LinkError> {
        let prefix = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let mut req = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            // Usable at once: no duplicate address detection on a link of our own.
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(LinkError::Netlink {
                what: "cannot add address",
                name: format!("{ip} to {name}"),
                source: e,
            }),
        }
    }

    async fn delete(&self, name: &str, index: u32) -> Result<(), LinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(Self::err("cannot delete interface", name)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A fake kernel: one optional link, and the kinds it knows.
    #[derive(Default)]
    struct Fake {
        link: RefCell<Option<LinkState>>,
        kinds: Vec<&'static str>,
        calls: RefCell<Vec<String>>,
    }

    impl LinkOps for Fake {
        async fn get(&self, _: &str) -> Result<Option<LinkState>, LinkError> {
            Ok(self.link.borrow().clone())
        }
        async fn create(&self, _: &str, kind: &str) -> Result<bool, LinkError> {
            self.calls.borrow_mut().push(format!("create {kind}"));
            if !self.kinds.contains(&kind) {
                return Ok(false);
            }
            *self.link.borrow_mut() = Some(LinkState {
                index: 7,
                kind: kind.into(),
                up: false,
                addresses: vec![],
            });
            Ok(true)
        }
        async fn set_up(&self, _: &str, index: u32) -> Result<(), LinkError> {
            self.calls.borrow_mut().push(format!("up {index}"));
            self.link.borrow_mut().as_mut().unwrap().up = true;
            Ok(())
        }
        async fn add_address(&self, _: &str, _: u32, ip: IpAddr) -> Result<(), LinkError> {
            self.calls.borrow_mut().push(format!("add {ip}"));
            self.link.borrow_mut().as_mut().unwrap().addresses.push(ip);
            Ok(())
        }
        async fn delete(&self, _: &str, index: u32) -> Result<(), LinkError> {
            self.calls.borrow_mut().push(format!("delete {index}"));
            *self.link.borrow_mut() = None;
            Ok(())
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn ips() -> Vec<IpAddr> {
        vec![
            "169.254.20.10".parse().unwrap(),
            "fd00::10".parse().unwrap(),
        ]
    }

    #[test]
    fn creates_dummy_and_is_idempotent() {
        let fake = Fake {
            kinds: vec!["dummy", "ifb"],
            ..Fake::default()
        };
        let c = block_on(ensure(&fake, "nodelocaldns", &ips())).unwrap();
        assert_eq!(c.created, Some("dummy"));
        assert!(c.set_up);
        assert_eq!(c.added, ips());
        let again = block_on(ensure(&fake, "nodelocaldns", &ips())).unwrap();
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn falls_back_to_ifb_without_dummy() {
        let fake = Fake {
            kinds: vec!["ifb"],
            ..Fake::default()
        };
        let c = block_on(ensure(&fake, "nodelocaldns", &ips())).unwrap();
        assert_eq!(c.created, Some("ifb"));
        assert_eq!(fake.calls.borrow()[..2], ["create dummy", "create ifb"]);
    }

    #[test]
    fn repairs_only_what_is_missing() {
        let fake = Fake::default();
        *fake.link.borrow_mut() = Some(LinkState {
            index: 3,
            kind: "ifb".into(),
            up: true,
            addresses: vec![ips()[0]],
        });
        let c = block_on(ensure(&fake, "nodelocaldns", &ips())).unwrap();
        assert_eq!(
            c,
            Changes {
                created: None,
                set_up: false,
                added: vec![ips()[1]]
            }
        );
    }

    #[test]
    fn a_foreign_link_is_neither_used_nor_removed() {
        let fake = Fake::default();
        *fake.link.borrow_mut() = Some(LinkState {
            index: 2,
            kind: "veth".into(),
            up: true,
            addresses: vec![],
        });
        assert!(matches!(
            block_on(ensure(&fake, "eth0", &ips())),
            Err(LinkError::Foreign { .. })
        ));
        assert!(block_on(remove(&fake, "eth0")).is_err());
        assert!(fake.calls.borrow().is_empty());
    }

    #[test]
    fn remove_is_idempotent() {
        let fake = Fake {
            kinds: vec!["dummy"],
            ..Fake::default()
        };
        block_on(ensure(&fake, "x", &ips())).unwrap();
        assert!(block_on(remove(&fake, "x")).unwrap());
        assert!(!block_on(remove(&fake, "x")).unwrap());
    }
}
