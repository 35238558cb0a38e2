pub mod config;
pub mod dns;
