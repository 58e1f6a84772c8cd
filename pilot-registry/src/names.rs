//! Hostname rules: which name a registration may claim. Pure code; a
//! storage backend only says who holds a name.
//!
//! A node holds at most one hostname, first come: asking for a valid name
//! nobody holds binds it to the node's identity (and releases the node's
//! previous name); a name another node holds is refused with a reason; a
//! registration that asks for no name keeps the one the node has.

use pilot_proto::identity::NodeId;
use pilot_proto::messages;

/// What a registration does to the node's hostname.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameDecision {
    /// Nothing changes: no name asked, or the node already holds it.
    Keep,
    /// The node gets this name.
    Grant(String),
    /// The name asked for is not granted (the node keeps its old one); the
    /// reason is shown to the node's operator.
    Refuse(String),
}

/// Decides on the name `want` for node `me`, which holds `current`.
/// `holder` says which node holds a name (asked only for a valid name the
/// node does not hold yet).
pub fn decide<E>(
    me: &NodeId,
    want: Option<&str>,
    current: Option<&str>,
    holder: impl FnOnce(&str) -> Result<Option<NodeId>, E>,
) -> Result<NameDecision, E> {
    let Some(want) = want else {
        return Ok(NameDecision::Keep);
    };
    if current == Some(want) {
        return Ok(NameDecision::Keep);
    }
    if !messages::valid_hostname(want) {
        return Ok(NameDecision::Refuse(format!(
            "{want:?} is not a valid hostname (a-z, 0-9, '-', at most 63)"
        )));
    }
    Ok(match holder(want)? {
        Some(other) if other != *me => {
            NameDecision::Refuse(format!("hostname {want:?} is taken by another node"))
        }
        _ => NameDecision::Grant(want.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    const ME: NodeId = NodeId([1; 16]);
    const OTHER: NodeId = NodeId([2; 16]);

    fn nobody(_: &str) -> Result<Option<NodeId>, Infallible> {
        Ok(None)
    }

    fn run(
        want: Option<&str>,
        current: Option<&str>,
        held_by: Option<NodeId>,
    ) -> (NameDecision, bool) {
        let mut asked = false;
        let d = decide::<Infallible>(&ME, want, current, |_| {
            asked = true;
            Ok(held_by)
        })
        .unwrap();
        (d, asked)
    }

    #[test]
    fn a_free_valid_name_is_granted() {
        assert_eq!(
            run(Some("agent-7"), None, None),
            (NameDecision::Grant("agent-7".into()), true)
        );
        // Renaming releases the old name (the backend overwrites it).
        assert_eq!(
            run(Some("agent-8"), Some("agent-7"), None),
            (NameDecision::Grant("agent-8".into()), true)
        );
    }

    #[test]
    fn no_name_asked_or_the_same_name_changes_nothing_and_asks_nobody() {
        assert_eq!(
            run(None, Some("alpha"), Some(OTHER)),
            (NameDecision::Keep, false)
        );
        assert_eq!(run(None, None, None), (NameDecision::Keep, false));
        assert_eq!(
            run(Some("alpha"), Some("alpha"), Some(OTHER)),
            (NameDecision::Keep, false)
        );
    }

    #[test]
    fn a_name_held_by_another_node_is_refused() {
        let (d, _) = run(Some("alpha"), Some("mine"), Some(OTHER));
        let NameDecision::Refuse(why) = d else {
            panic!("expected a refusal, got {d:?}")
        };
        assert!(why.contains("taken"), "{why}");
        // Held by this very node (a stale current): granted again.
        assert_eq!(
            run(Some("alpha"), None, Some(ME)),
            (NameDecision::Grant("alpha".into()), true)
        );
    }

    #[test]
    fn invalid_names_are_refused_without_asking_storage() {
        for bad in ["", "-x", "UPPER", "10.0.0.1", "a.b", &"a".repeat(64)] {
            let (d, asked) = run(Some(bad), None, None);
            let NameDecision::Refuse(why) = d else {
                panic!("{bad:?} should be refused, got {d:?}")
            };
            assert!(why.contains("not a valid hostname"), "{why}");
            assert!(!asked, "{bad:?}: storage asked about an invalid name");
        }
        // A name that parses as a node id would make `PeerRef` ambiguous.
        let as_id = ME.to_string();
        assert!(matches!(
            run(Some(&as_id), None, None).0,
            NameDecision::Refuse(_)
        ));
    }

    #[test]
    fn a_storage_error_is_passed_on() {
        assert_eq!(
            decide(&ME, Some("alpha"), None, |_| Err::<Option<NodeId>, _>(
                "disk"
            )),
            Err("disk")
        );
        assert_eq!(
            decide(&ME, Some("alpha"), None, nobody),
            Ok(NameDecision::Grant("alpha".into()))
        );
    }
}
