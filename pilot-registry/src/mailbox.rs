//! The mailbox: which nodes may have trust statements waiting, turning what
//! storage holds for them into pushes, and asking again until each push is
//! acknowledged (a lost datagram is resent on the next tick).

use std::collections::HashSet;

use pilot_proto::identity::NodeId;
use pilot_proto::messages::{FromRegistry, PushItem};

use crate::sessions::{Reply, Sessions};
use crate::store::{Job, Store};

/// Who may have mail, and whose mail is being read.
#[derive(Default)]
pub struct Mailbox {
    waiting: HashSet<NodeId>,
    reading: HashSet<NodeId>,
}

impl Mailbox {
    /// Mail may wait for `to` (a statement was stored for it, or it came
    /// online).
    pub fn note(&mut self, to: NodeId) {
        self.waiting.insert(to);
    }

    /// What storage holds for `to`: pushes for its session if it is online.
    /// An empty mailbox is forgotten until the next statement.
    pub fn deliver(
        &mut self,
        to: &NodeId,
        items: Vec<(u64, PushItem)>,
        sessions: &Sessions,
    ) -> Vec<Reply> {
        self.reading.remove(to);
        if items.is_empty() {
            self.waiting.remove(to);
            return vec![];
        }
        let Some((index, _)) = sessions.online(to) else {
            return vec![];
        };
        items
            .into_iter()
            .map(|(id, item)| Reply {
                to: index,
                msg: FromRegistry::Push { id, item },
            })
            .collect()
    }

    /// Every half second: read again the mail of online nodes that have
    /// some, so unacknowledged pushes are resent. A full storage queue just
    /// means the next tick tries again.
    pub fn on_tick(&mut self, sessions: &Sessions, store: &Store) {
        let due: Vec<NodeId> = self
            .waiting
            .iter()
            .filter(|id| !self.reading.contains(id) && sessions.online(id).is_some())
            .copied()
            .collect();
        for to in due {
            if store.submit(Job::Mail { to }).is_err() {
                return;
            }
            self.reading.insert(to);
        }
    }

    /// A mail read failed: try again on the next tick.
    pub fn failed(&mut self, to: &NodeId) {
        self.reading.remove(to);
    }
}
