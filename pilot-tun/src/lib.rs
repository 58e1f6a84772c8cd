//! pilot-tun: the node daemon of a pilot-tun overlay network, as a library
//! (the binary is a thin CLI over it, and the in-process tests drive it
//! directly over fake TUN devices).

pub mod api;
pub mod audit;
pub mod audit_cmd;
pub mod cli;
pub mod context;
pub mod control;
pub mod controller;
pub mod dataplane;
pub mod divert;
pub mod dns;
pub mod fleet;
pub mod fleetctl;
pub mod gossip;
pub mod hostname;
pub mod ipv6;
pub mod link;
pub mod metrics;
pub mod netcheck;
pub mod node;
pub mod pathmtu;
pub mod peers;
pub mod portmap;
pub mod resolved;
pub mod rotation;
pub mod routes;
pub mod sanitize;
pub mod shared;
pub mod shell_docs;
pub mod state;
pub mod tcplink;
pub mod tun;
pub mod tunnels;
pub mod udp;

pub use node::{Node, NodeConfig, StartError};
