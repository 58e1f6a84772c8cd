//! pilot-tun: the node daemon of a pilot-tun overlay network, as a library
//! (the binary is a thin CLI over it, and the in-process tests drive it
//! directly over fake TUN devices).

pub mod cli;
pub mod control;
pub mod dataplane;
pub mod link;
pub mod node;
pub mod pathmtu;
pub mod peers;
pub mod state;
pub mod tun;
pub mod tunnels;
pub mod udp;

pub use node::{Node, NodeConfig, StartError};
