//! Choosing the upstream pool for a name: longest zone suffix wins, on label boundaries.

use std::collections::HashMap;

use crate::dns::query::text_to_wire;

/// Maps zones to pool indices; names under no zone go to the default pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    zones: HashMap<Vec<u8>, usize>,
    default: usize,
}

impl Router {
    /// `zones` are dotted names ("cluster.local"); a later duplicate wins.
    pub fn new<'a>(zones: impl IntoIterator<Item = (&'a str, usize)>, default: usize) -> Router {
        Router {
            zones: zones
                .into_iter()
                .map(|(z, pool)| (text_to_wire(z), pool))
                .collect(),
            default,
        }
    }

    /// The pool for a lower-cased wire name. Checks each suffix that starts on a label
    /// boundary, longest first.
    pub fn route(&self, qname: &[u8]) -> usize {
        let mut at = 0;
        while at < qname.len() {
            if let Some(&pool) = self.zones.get(&qname[at..]) {
                return pool;
            }
            let len = qname[at] as usize;
            if len == 0 {
                break;
            }
            at += 1 + len;
        }
        self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_suffix_on_label_boundaries() {
        let r = Router::new(
            [
                ("cluster.local", 1),
                ("in-addr.arpa", 1),
                ("corp.example", 2),
                ("deep.corp.example", 3),
                (".", 4),
            ]
            .into_iter()
            .filter(|(z, _)| *z != "."),
            0,
        );
        let w = text_to_wire;
        assert_eq!(r.route(&w("kube-dns.kube-system.svc.cluster.local")), 1);
        assert_eq!(r.route(&w("cluster.local")), 1);
        assert_eq!(r.route(&w("10.0.96.10.in-addr.arpa")), 1);
        assert_eq!(r.route(&w("a.corp.example")), 2);
        assert_eq!(r.route(&w("x.deep.corp.example")), 3);
        // a suffix that is not on a label boundary must not match
        assert_eq!(r.route(&w("notcorp.example")), 0);
        assert_eq!(r.route(&w("example.com")), 0);
        assert_eq!(r.route(&w("")), 0);
    }

    #[test]
    fn root_zone_catches_everything() {
        let r = Router::new([(".", 7)], 0);
        assert_eq!(r.route(&text_to_wire("anything.example")), 7);
    }
}
