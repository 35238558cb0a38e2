//! The pure DNS core: wire parsing, cache keys, stored answers and TTL rewriting, error
//! responses. No sockets, no clock, no tokio: every function here is unit-tested on bytes.

pub mod answer;
pub mod query;
pub mod wire;

pub use answer::{Answer, AnswerError, Kind, Ttl, TtlPolicy};
pub use query::{Echo, Key, Query, Reject};
