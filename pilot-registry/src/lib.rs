//! pilot-registry: the rendezvous server of a pilot-tun network.
//!
//! It hands out permanent overlay addresses, answers STUN, carries signed
//! trust statements between nodes (keeping them on disk for nodes that are
//! offline) and tells a node where a peer is only if that peer approved it.
//! It never holds a key that could read tunnel traffic.

pub mod names;
pub mod pool;
pub mod registrar;
pub mod server;
pub mod state;
pub mod storage;

pub use server::{Config, Registry, Stats};
pub use storage::{SqliteStorage, Storage};
