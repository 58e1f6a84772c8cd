//! pilot-registry: the rendezvous server of a pilot-tun network.
//!
//! It hands out permanent overlay addresses, answers STUN, carries signed
//! trust statements between nodes (keeping them on disk for nodes that are
//! offline) and tells a node where a peer is only if that peer approved it.
//! It never holds a key that could read tunnel traffic.
//!
//! Modules, by role (each uses only modules listed after it, so nothing
//! imports in a circle):
//! - [`server`]: the socket loop; drives the roles and sends what they return.
//! - [`tcp`]: the TCP relay listener (TLS), for nodes whose networks
//!   block UDP: their frames enter the socket loop as datagrams.
//! - [`web`]: the HTTP pages: `/metrics` for Prometheus and the status page.
//! - [`view`]: what those pages see of the running registry.
//! - [`relay_only`]: the relay-only instance's answers to control messages.
//! - [`rendezvous`]: the registry's answers to control messages.
//! - [`mailbox`]: pushes of stored trust statements, until acknowledged.
//! - [`relay`]: forwarding between nodes that approved each other.
//! - [`sessions`]: control sessions and the nodes behind them.
//! - [`admission`]: the handshake thread (Noise off the packet path).
//! - [`store`]: the storage thread and its bounded queue.
//! - [`expiry`]: the thread that expires unused registrations.
//! - [`registrar`]: what a registration or statement may change.
//! - [`fleet`]: which owner certificates and revocations are kept, in pages.
//! - [`pool`], [`names`]: the address pool and hostname rules.
//! - [`storage`]: persistence behind one trait (SQLite);
//!   [`storage_pg`]: the same on PostgreSQL.
//! - [`operator`]: the operator's offline commands (join tokens, nodes).
//! - [`stats`], [`state`]: counters; the key file and join URL.
//! - [`audit`]: the audit log's writer thread and per-minute counts.
//! - [`cluster`]: several instances on one database: their events
//!   (LISTEN/NOTIFY) and the relayed datagrams passed between them.
//! - [`priority`]: the threads beside the socket loop yield to it.

pub mod admission;
pub mod audit;
pub mod batch;
pub mod cluster;
pub mod expiry;
pub mod fleet;
pub mod mailbox;
pub mod names;
pub mod operator;
pub mod pool;
pub mod priority;
pub mod registrar;
pub mod relay;
pub mod relay_only;
pub mod rendezvous;
pub mod server;
pub mod sessions;
pub mod state;
pub mod stats;
pub mod storage;
pub mod storage_pg;
#[cfg(test)]
mod storage_suite;
pub mod store;
pub mod tcp;
pub mod view;
pub mod web;

pub use server::{Config, Limits, Registry};
pub use stats::Stats;
pub use storage::{SqliteStorage, Storage};
pub use storage_pg::PgStorage;
pub use view::View;
