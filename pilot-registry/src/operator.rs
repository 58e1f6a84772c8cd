//! The operator's commands on the registry's database, run offline like
//! `audit` (whether or not the registry runs): join tokens (`token
//! create|list|revoke`) and the registered nodes (`nodes list|remove`), with the
//! typed documents their `--json` prints.

use serde::{Deserialize, Serialize};

use crate::storage::{NodeRow, Storage, StorageError, TokenRow};

/// SHA-256 of a join token: what the registry keeps and looks up.
pub fn token_hash(token: &[u8; 16]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Nodes `nodes list` reads at most.
pub const MAX_LIST: usize = 1_000_000;

/// A new join token and what is kept of it.
pub struct NewToken {
    /// The token (shown once; only its hash is kept).
    pub token: pilot_proto::join::JoinToken,
    /// The row kept.
    pub row: TokenRow,
}

/// Makes a join token allowing `uses` registrations (`None`: any number)
/// until `expires_at` (`None`: never), keeps its hash, and returns it.
pub fn create_token(
    s: &mut dyn Storage,
    uses: Option<u64>,
    expires_at: Option<u64>,
    now: u64,
) -> Result<NewToken, StorageError> {
    let mut secret = [0u8; 16];
    // The system generator does not fail once the kernel has seeded it
    // (getrandom blocks until then).
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .expect("the system random generator");
    let hash = token_hash(&secret);
    let row = TokenRow {
        id: pilot_proto::hex::encode(&hash[..6]),
        hash,
        uses,
        used: 0,
        expires_at,
        created: now,
        revoked: false,
    };
    s.put_token(&row)?;
    Ok(NewToken {
        token: pilot_proto::join::JoinToken(secret),
        row,
    })
}

/// One line of `token list`.
pub fn token_line(t: &TokenRow, now: u64) -> String {
    let uses = match t.uses {
        Some(n) => format!("{}/{n} used", t.used),
        None => format!("{} used, no limit", t.used),
    };
    let state = if t.revoked {
        "revoked".to_string()
    } else if t.expires_at.is_some_and(|e| e <= now) {
        "expired".to_string()
    } else if t.uses.is_some_and(|n| t.used >= n) {
        "used up".to_string()
    } else {
        match t.expires_at {
            Some(e) => format!("valid until {}", pilot_proto::lifetime::utc(e)),
            None => "valid, no expiry".to_string(),
        }
    };
    format!(
        "{}  {uses:<20} {state}  (made {})",
        t.id,
        pilot_proto::lifetime::utc(t.created)
    )
}

/// `nodes list --json`: every registered node, by address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    /// The nodes.
    pub nodes: Vec<NodeEntry>,
}

/// One registered node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Its node id (32 hex digits).
    pub id: String,
    /// Its permanent overlay address.
    pub address: std::net::Ipv4Addr,
    /// Its hostname, if it holds one.
    pub hostname: Option<String>,
    /// Its endpoints as last registered (the observed one first).
    pub endpoints: Vec<std::net::SocketAddr>,
}

impl From<&NodeRow> for NodeEntry {
    fn from(r: &NodeRow) -> Self {
        NodeEntry {
            id: r.identity.node_id().to_string(),
            address: r.address,
            hostname: r.hostname.clone(),
            endpoints: r.endpoints.clone(),
        }
    }
}

/// The registered nodes, by address.
pub fn list_nodes(s: &dyn Storage) -> Result<NodeList, StorageError> {
    Ok(NodeList {
        nodes: s.nodes(MAX_LIST)?.iter().map(NodeEntry::from).collect(),
    })
}

/// Finds a node by id (32 hex digits) or hostname and removes it
/// ([`Storage::remove_node`]): what was removed, or `None` if no node is
/// called that.
pub fn remove_node(
    s: &mut dyn Storage,
    who: &str,
    now: u64,
) -> Result<Option<NodeEntry>, StorageError> {
    let row = match who.parse::<pilot_proto::identity::NodeId>() {
        Ok(id) => s.node(&id)?,
        Err(_) => s.node_by_name(who)?,
    };
    let Some(row) = row else { return Ok(None) };
    if !s.remove_node(&row.identity.node_id(), now)? {
        return Ok(None);
    }
    Ok(Some(NodeEntry::from(&row)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{SqliteStorage, TokenUse};

    #[test]
    fn a_token_is_kept_as_its_hash_and_counted() {
        let mut s = SqliteStorage::in_memory().unwrap();
        let t = create_token(&mut s, Some(1), Some(2000), 1000).unwrap();
        let kept = s.tokens().unwrap();
        assert_eq!(kept, vec![t.row.clone()]);
        assert_ne!(&kept[0].hash[..16], &t.token.0[..], "not the token itself");
        assert_eq!(kept[0].id.len(), 12);
        assert!(token_line(&kept[0], 1000).contains("0/1 used"));
        assert_eq!(
            s.use_token(&token_hash(&t.token.0), 1001).unwrap(),
            TokenUse::Used
        );
        assert!(token_line(&s.tokens().unwrap()[0], 1001).contains("used up"));
        let other = create_token(&mut s, None, None, 1000).unwrap();
        assert_ne!(other.token, t.token);
        assert!(token_line(&other.row, 1000).contains("no limit"));
    }

    #[test]
    fn a_node_is_removed_by_id_or_by_name() {
        use crate::storage::NodeRow;
        use pilot_proto::identity::Identity;
        let mut s = SqliteStorage::in_memory().unwrap();
        for (n, name) in [(1u8, "alpha"), (2, "beta")] {
            s.insert_node(&NodeRow {
                identity: Identity::from_bytes(&[n; 64]).public(),
                address: std::net::Ipv4Addr::new(10, 77, 0, n),
                hostname: Some(name.into()),
                endpoints: vec![],
                reg_seq: 1,
                reg_digest: None,
            })
            .unwrap();
        }
        let gone = remove_node(&mut s, "alpha", 5).unwrap().unwrap();
        assert_eq!(gone.hostname.as_deref(), Some("alpha"));
        let beta = Identity::from_bytes(&[2; 64]).node_id().to_string();
        assert_eq!(remove_node(&mut s, &beta, 5).unwrap().unwrap().id, beta);
        assert_eq!(remove_node(&mut s, "alpha", 5).unwrap(), None);
        assert!(list_nodes(&s).unwrap().nodes.is_empty());
    }

    /// The `nodes list --json` document, as the README shows it.
    fn example() -> NodeList {
        NodeList {
            nodes: vec![
                NodeEntry {
                    id: "6f1c2a9e0b7d4c3f8a5e1d2c3b4a5968".into(),
                    address: "10.77.12.5".parse().unwrap(),
                    hostname: Some("build-1".into()),
                    endpoints: vec![
                        "203.0.113.9:41641".parse().unwrap(),
                        "192.168.1.20:41641".parse().unwrap(),
                    ],
                },
                NodeEntry {
                    id: "0a9b8c7d6e5f40312233445566778899".into(),
                    address: "10.77.200.17".parse().unwrap(),
                    hostname: None,
                    endpoints: vec!["198.51.100.4:7000".parse().unwrap()],
                },
            ],
        }
    }

    #[test]
    fn the_readme_shows_the_node_list_exactly() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let marker = "<!-- schema: registry-nodes -->";
        let at = readme.find(marker).expect("README.md has the marker");
        let rest = &readme[at + marker.len()..];
        let start = rest.find("```json\n").expect("a json block") + 8;
        let end = rest[start..].find("\n```").expect("the block ends");
        let json = serde_json::to_string_pretty(&example()).unwrap();
        assert_eq!(&rest[start..start + end], json);
        let back: NodeList = serde_json::from_str(&json).unwrap();
        assert_eq!(back, example());
    }
}
