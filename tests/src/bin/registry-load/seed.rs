//! Rows for the `nodes` table, written straight into the database so the
//! registry can be measured with a million identities without registering
//! them: SQL for `sqlite3`, CSV for PostgreSQL's `\copy`.
//!
//! The keys are random bytes, not key pairs: the registry does not check a
//! stored row's binding when it reads it (it checked it when the node
//! registered), and a lookup answers with whatever the row holds.

use std::io::Write;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use pilot_proto::identity::NodeId;

/// The `i`-th seeded node's overlay address: hosts .1 to .254 of each /24
/// of `network`, in order.
pub fn seeded_address(network: Ipv4Net, i: u64) -> Option<Ipv4Addr> {
    let host = (i / 254) * 256 + (i % 254) + 1;
    let size = 1u64 << (32 - network.prefix_len());
    (host < size).then(|| Ipv4Addr::from(u32::from(network.network()) + host as u32))
}

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

/// Writes `count` rows to `out`.
pub fn write(
    out: &mut impl Write,
    count: u64,
    network: Ipv4Net,
    format: Format,
) -> std::io::Result<()> {
    let mut x = 0x5EED_u64;
    if let Format::Sqlite = format {
        writeln!(out, "BEGIN;")?;
    }
    for i in 0..count {
        let Some(addr) = seeded_address(network, i) else {
            return Err(std::io::Error::other(format!(
                "{network} holds fewer than {count} addresses; give a wider --network"
            )));
        };
        let ed: [u8; 32] = bytes(&mut x);
        let st: [u8; 32] = bytes(&mut x);
        let binding: [u8; 64] = bytes(&mut x);
        let id = NodeId::from_ed25519(&ed);
        let ep = format!("127.9.{}.{}:4000", (i / 254) % 254 + 1, i % 254 + 1);
        match format {
            Format::Sqlite => {
                if i % 500 == 0 {
                    if i > 0 {
                        writeln!(out, ";")?;
                    }
                    write!(out, "INSERT INTO nodes ({COLUMNS}) VALUES\n")?;
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
