//! pgpilot: a PostgreSQL high-availability proxy.
//!
//! ```text
//! client ──TCP/TLS──▶ app (listener) ──▶ client task (one per connection)
//!                                          │ startup: SSLRequest / GSSENCRequest / CancelRequest
//!                                          │ auth (SCRAM-SHA-256, md5, trust)
//!                                          ▼
//!                                 per request: classify ── router ── pool(node, db, user) ── server ──▶ PostgreSQL
//!                                          ▲         ▲
//!                                          │         └── ClusterView snapshot (ArcSwap)
//!                                          │                      ▲
//!                                          │        probes (one task per node)
//!                                          │                      │ verdicts
//!                                          └── fenced ◀── failover driver: promote, repoint, fence
//! ```
//!
//! - [`protocol`]: framing (`Frame`, `FrameCodec`), startup packets, typed views, encoders.
//! - [`auth`]: client authentication; [`server`]: backend connections and their authentication.
//! - [`client`]: the per-client task; [`pool`]: pools and the checkout guard.
//! - [`cluster`]: the topology snapshot and probes; [`router`]: where work goes.
//! - [`admin`]: the PgBouncer-compatible admin console (`SHOW ...`, `SWITCHOVER`, `FENCE`).
//! - [`stats`] and [`metrics`]: traffic counters, SHOW STATS and the Prometheus endpoint.
//! - [`failover`]: the failover controller (a pure verdict function) and its driver,
//!   switchover and forced promotion.
//! - [`config`]: the TOML surface; [`net`]: sockets and TLS; [`app`]: wiring and shutdown.
//! - [`devcluster`]: a local primary + replicas for the demo, tests and benches.
//!
//! Transaction pooling (the default) lives in `client::txn` (routing loop), `client::busy`
//! (one borrowed connection), `client::unit` (requests and what they mean),
//! `client::prepared` (statement renaming and re-Parse) and `client::settings`; session pooling
//! is the plain relay in `client::relay`.
//!
//! Dependencies differ from the design's first list in one place: pgwire is not used. The
//! server side of SCRAM is a small sans-IO module (`auth::scram`) over hmac/sha2/base64, which
//! postgres-protocol already brings in, tested against postgres-protocol's client; the
//! proxy owns the whole startup phase and the wire encoders it needs.

#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, unused_qualifications)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod conninfo;
#[cfg(feature = "etcd")]
pub mod coordinator;
pub mod demo;
pub mod devcluster;
pub mod failover;
pub mod gate;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod protocol;
pub mod registry;
pub mod reload;
pub mod router;
pub mod server;
pub mod stats;
