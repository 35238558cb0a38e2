//! The userspace cost of one cache hit, without sockets: parse the query, look it up,
//! render the answer. `cargo bench --bench hit_path` prints nanoseconds per hit; the
//! kernel's share (receive and send) is measured by bench/run.sh against the floor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use localdns::config::{load_documents, Environment};
use localdns::dns::{Answer, Query, TtlPolicy};
use localdns::metrics::Metrics;
use localdns::server::resolve::{Resolver, Settings};
use localdns::server::{handle, Action};

fn query(id: u16, name: &str, edns: bool) -> Vec<u8> {
    let mut m = vec![
        (id >> 8) as u8,
        id as u8,
        1,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        u8::from(edns),
    ];
    for label in name.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    if edns {
        m.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
    }
    m
}

fn main() {
    let doc = "[listen]\naddresses = [\"127.0.0.1\"]\nport = 5300\n[upstream]\nservers = [\"127.0.0.2:53\"]\n[network]\nsetup_interface = false\nsetup_rules = false\n";
    let cfg = load_documents(
        &[(PathBuf::from("bench.toml"), doc.into())],
        &Environment::default(),
    )
    .expect("config");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let cache = Arc::new(localdns::cache::Cache::new(
        20000,
        3600,
        (&cfg.cache).into(),
    ));
    let resolver = Arc::new(Resolver::new(
        Arc::clone(&cache),
        Settings::from_config(&cfg, None),
        Arc::new(Metrics::default()),
        runtime.handle().clone(),
    ));
    let policy = TtlPolicy {
        min_ttl: 0,
        max_ttl: 3600,
        negative_max_ttl: 5,
        servfail_ttl: 1,
    };
    let names: Vec<String> = (0..1000)
        .map(|i| format!("svc-{i}.ns.svc.cluster.local"))
        .collect();
    for name in &names {
        let q = query(1, name, true);
        let key = Query::parse(&q).expect("query").key();
        let mut r = q[..q.len() - 11].to_vec();
        r[2] = 0x85;
        r[3] = 0x80;
        r[7] = 1;
        r[11] = 0;
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 14, 16, 0, 4, 10, 96, 0, 1]);
        let answer = Answer::from_upstream(&r, 1, &key, &policy).expect("answer");
        assert!(cache.insert(&key, answer).is_ok(), "stored");
    }
    let packets: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| query(i as u16, n, true))
        .collect();
    let mut out = Vec::with_capacity(4096);
    let rounds = 3_000_000;
    let start = Instant::now();
    let mut hits = 0u64;
    let mut now = 0;
    // A receive loop's own statistics block, counted as in the daemon.
    let stats = localdns::metrics::Stats::owned();
    for i in 0..rounds {
        // The receive loop reads the clock once per batch of up to 32 datagrams.
        if i % 32 == 0 {
            now = resolver.cache.now_ms();
        }
        if let Action::Hit = handle(
            &resolver,
            &packets[i % packets.len()],
            &mut out,
            false,
            now,
            &stats,
        ) {
            hits += 1;
        }
    }
    let per = start.elapsed().as_nanos() as f64 / rounds as f64;
    assert_eq!(hits, rounds as u64, "every query must hit");
    println!("hit path (parse, look up, render): {per:.0} ns per query over {rounds} queries, {} bytes out", out.len());
}
