//! Helpers shared by `tests/integration.rs`: a fake upstream DNS server, the localdns process
//! guard, a DNS client, a `dig` wrapper and a metrics scraper.

// Each helper module is compiled into the one test binary; not every test uses every helper.
#![allow(dead_code)]

pub mod client;
pub mod daemon;
pub mod dig;
pub mod metrics;
pub mod nsd;
pub mod skipped;
pub mod upstream;
