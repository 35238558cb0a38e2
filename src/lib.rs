//! localdns: a node-local DNS cache for Kubernetes nodes, run as a host systemd service
//! started before kubelet, so that a node has DNS before its first pod and never loses
//! it on crash, restart, upgrade or removal.
//!
//! # Layout
//! - [`allocator`]: mimalloc's housekeeping: free pages go back to the kernel when unused.
//! - [`cli`]: the command line as data (clap); the man page is rendered from it.
//! - [`daemon`]: the life cycle of `localdns run`: kept sockets, node setup, serve, stop.
//! - [`config`]: raw TOML → merged (`config.toml` + `conf.d/*.toml`) → validated [`config::Config`].
//! - [`dns`]: the pure protocol core: query parsing, cache keys, stored answers, TTL rewriting.
//! - [`cache`]: the sharded answer store, bounded in entries and bytes, with serve-stale and prefetch marks.
//! - [`upstream`]: routing by zone, upstream pools with failover and health, idle health
//!   probes, UDP/TCP exchange, rotated pipelined TCP connections.
//! - [`server`]: listeners (UDP hit-path loops, TCP), the miss path, the HTTP endpoint.
//! - [`node`]: the node's network setup: the link holding the listen addresses
//!   (rtnetlink), the NOTRACK/ACCEPT rules (nftables or iptables), setup/teardown, drift
//!   repair (netlink events).
//! - [`config_sync`]: `localdns config-sync`, the DaemonSet that writes a ConfigMap into
//!   the host's `conf.d/` (validated with [`config`], atomic, removed on stop).
//! - [`metrics`]: per-thread counters merged at scrape time; the Prometheus/OpenMetrics
//!   exposition with CoreDNS's names beside localdns's own.
//! - [`health`]: is the node's DNS healthy and ready, and why not: the pure decisions
//!   behind `/health`, `/ready` and `localdns status`, and the report they share.
//! - [`status`]: `localdns status`: asks the running daemon and checks its addresses.
//! - [`systemd`]: sd_notify readiness, status, watchdog and reload; the fd store.
//! - [`state`]: what is kept between runs: the last good config, what setup created.
//! - [`lifecycle`]: how far the last process got, and the brake on restarts after failures.
//! - [`process`]: helper programs (nft, iptables, systemctl) run with a time bound.
//! - [`logging`]: journald or stderr.
//! - [`watch`]: inotify events for async code (reload, config-sync).
// One audited exception: adopting the descriptors systemd passes (`systemd::adopt`).
#![deny(unsafe_code)]

pub mod allocator;
pub mod bridge;
pub mod cache;
pub mod cli;
pub mod config;
pub mod config_sync;
pub mod daemon;
pub mod dns;
pub mod fallback;
pub mod handover;
pub mod health;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod process;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod status;
pub mod systemd;
pub mod upstream;
pub mod watch;
