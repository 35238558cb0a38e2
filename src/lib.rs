pub mod cache;
pub mod config;
pub mod dns;
pub mod metrics;
pub mod upstream;
