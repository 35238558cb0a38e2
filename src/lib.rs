//! localdns: a node-local DNS cache for Kubernetes nodes, run as a host systemd service.

pub mod config;
