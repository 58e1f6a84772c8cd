//! Rows for the `nodes` table, written straight into the database so the
//! registry can be measured with a million identities without registering
//! them: SQL for `sqlite3`, CSV for PostgreSQL's `\copy`.
//!
//! The keys are random bytes, not key pairs: the registry does not check a
//! stored row's binding when it reads it (it checked it when the node
//! registered), and a lookup answers with whatever the row holds.

use std::collections::HashSet;
use std::io::Write;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use pilot_proto::identity::NodeId;
use pilot_registry::pool;

/// splitmix64: cheap, reproducible bytes for throwaway keys.
pub fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn bytes<const N: usize>(x: &mut u64) -> [u8; N] {
    let mut out = [0u8; N];
    for c in out.chunks_mut(8) {
        let v = splitmix(x).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Which tool reads the rows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// Multi-row INSERTs in one transaction, for `sqlite3 registry.db`.
    Sqlite,
    /// CSV for `\copy nodes (...) FROM STDIN WITH (FORMAT csv)` in psql.
    Pg,
}

/// The columns written, in order (the others keep their defaults).
pub const COLUMNS: &str = "node_id, ed_public, static_pub, binding, address, reg_seq, endpoints";

/// The seeded rows, in order: keys from a fixed seed (so the generator can
/// name the same ids again) and each node's address where the registry's
/// pool would put it (its first free candidate), so the pool is laid out
/// as registrations would have left it.
pub struct Rows {
    x: u64,
    network: Ipv4Net,
    taken: HashSet<Ipv4Addr>,
    pub ed: [u8; 32],
    pub st: [u8; 32],
    pub binding: [u8; 64],
}

impl Rows {
    pub fn new(network: Ipv4Net) -> Self {
        Rows {
            x: 0x5EED,
            network,
            taken: HashSet::new(),
            ed: [0; 32],
            st: [0; 32],
            binding: [0; 64],
        }
    }

    /// The next node id (its keys in `ed`, `st`, `binding`).
    pub fn next_id(&mut self) -> NodeId {
        self.ed = bytes(&mut self.x);
        self.st = bytes(&mut self.x);
        self.binding = bytes(&mut self.x);
        NodeId::from_ed25519(&self.ed)
    }

    /// The next row's id and address; `None` when the network is full.
    fn next_row(&mut self) -> Option<(NodeId, Ipv4Addr)> {
        let id = self.next_id();
        let addr = pool::candidates(&id, self.network).find(|a| !self.taken.contains(a))?;
        self.taken.insert(addr);
        Some((id, addr))
    }
}

/// The first `count` seeded node ids (no addresses: cheap).
pub fn seeded_ids(count: u64, network: Ipv4Net) -> Vec<NodeId> {
    let mut rows = Rows::new(network);
    (0..count).map(|_| rows.next_id()).collect()
}

/// Writes `count` rows to `out`.
pub fn write(
    out: &mut impl Write,
    count: u64,
    network: Ipv4Net,
    format: Format,
) -> std::io::Result<()> {
    if let Format::Sqlite = format {
        writeln!(out, "BEGIN;")?;
    }
    let mut rows = Rows::new(network);
    for i in 0..count {
        let Some((id, addr)) = rows.next_row() else {
            return Err(std::io::Error::other(format!(
                "{network} holds fewer than {count} addresses; give a wider --network"
            )));
        };
        let (ed, st, binding) = (rows.ed, rows.st, rows.binding);
        let ep = format!("127.9.{}.{}:4000", (i / 254) % 254 + 1, i % 254 + 1);
        match format {
            Format::Sqlite => {
                if i % 500 == 0 {
                    if i > 0 {
                        writeln!(out, ";")?;
                    }
                    writeln!(out, "INSERT INTO nodes ({COLUMNS}) VALUES")?;
                } else {
                    writeln!(out, ",")?;
                }
                write!(
                    out,
                    "('{id}',X'{}',X'{}',X'{}',{},1,'{ep}')",
                    hex(&ed),
                    hex(&st),
                    hex(&binding),
                    u32::from(addr)
                )?;
            }
            Format::Pg => writeln!(
                out,
                "{id},\\x{},\\x{},\\x{},{},1,{ep}",
                hex(&ed),
                hex(&st),
                hex(&binding),
                u32::from(addr)
            )?,
        }
    }
    if let Format::Sqlite = format {
        if count > 0 {
            writeln!(out, ";")?;
        }
        writeln!(out, "COMMIT;")?;
    }
    out.flush()
}
