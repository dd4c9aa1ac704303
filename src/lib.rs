//! segmenter: live behavioural customer segments from a Kafka event stream.
//!
//! Data flow (one path per input partition):
//!
//! ```text
//! bytes ──decode──▶ Event ──engine──▶ CustomerState (features) ──rules::eval──▶ memberships
//!                                 │                                   │
//!                         durable timers ◀── next change time ◀───────┘
//!                                 │
//!                                 └──▶ Change (entered/exited) ──▶ stdout (replay) / Kafka
//! ```
//!
//! - `model`: plain types (events, changes, time). `decode`: input bytes → events.
//! - `rules`: the rule language — parse, type-check, compile to a feature layout, evaluate. Pure.
//! - `features`: the per-customer aggregates the compiled rules need. Pure.
//! - `engine`: the synchronous step per partition (events, timers, changes) over a `store::Store`.
//! - `store`: key layout, value codec, RocksDB. `settings`: config file + env overrides.
//! - `replay`: the offline command; `generate`: realistic synthetic traffic; `loadgen`: that
//!   traffic produced to Kafka (`segmenter generate`, the demo).
//! - `kafka`: consumer/producer edges; `pipeline`: per-partition workers (outbox, offsets,
//!   members index, wall timers); `app`: wiring and ordered shutdown of `segmenter run`.
//! - `metrics`: every Prometheus metric, in one place; `api`: what the HTTP routes answer
//!   (reads from RocksDB, erasure through the owning worker); `http`: the axum routes, their
//!   access control and limits, and the (TLS) listener; `auth`: bearer tokens (hashes, roles).
//!
//! The modules that need RocksDB, Kafka, tokio, axum or prometheus are behind the default
//! `service` feature; without it the crate is the pure core that `fuzz/` builds.

#[cfg(feature = "service")]
pub mod api;
#[cfg(feature = "service")]
pub mod app;
pub mod auth;
pub mod changelog;
pub mod decode;
#[cfg(feature = "service")]
pub mod demo;
pub mod engine;
pub mod features;
pub mod generate;
#[cfg(feature = "service")]
pub mod http;
#[cfg(feature = "service")]
pub mod kafka;
#[cfg(feature = "service")]
pub mod loadgen;
#[cfg(feature = "service")]
pub mod metrics;
pub mod model;
pub mod outbox;
#[cfg(feature = "service")]
pub mod pipeline;
#[cfg(feature = "service")]
pub mod replay;
pub mod rules;
pub mod settings;
pub mod store;
