//! Maps the BackendKeyData a client was given to the server connection currently serving it, so
//! a CancelRequest arriving on a new connection reaches the right backend.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::protocol::startup::BackendKey;

/// Where a client's cancel request must go.
#[derive(Clone)]
pub enum CancelTarget {
    /// The server connection the client has borrowed.
    Server {
        host: String,
        port: u16,
        key: BackendKey,
    },
    /// A request on a pipelined lane: the cancel may only reach the server while that request
    /// is the one running; before that, the lane sends it when the request gets there.
    Lane(crate::pool::Ticket),
}

impl CancelTarget {
    /// Where to send the cancel request now, if anywhere.
    pub fn resolve(&self) -> Option<(String, u16, BackendKey)> {
        match self {
            CancelTarget::Server { host, port, key } => Some((host.clone(), *port, *key)),
            CancelTarget::Lane(t) => t.lane.cancel(t.id),
        }
    }
}

/// The server a client is using right now; the client task updates it as it borrows and
/// returns connections, without touching the shared map.
pub type CancelSlot = Arc<Mutex<Option<CancelTarget>>>;

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<BackendKey, CancelSlot>>,
}

impl CancelRegistry {
    pub fn register(&self, client_key: BackendKey) -> CancelSlot {
        let slot = CancelSlot::default();
        self.map.lock().insert(client_key, slot.clone());
        slot
    }

    pub fn unregister(&self, client_key: BackendKey) {
        self.map.lock().remove(&client_key);
    }

    pub fn lookup(&self, client_key: BackendKey) -> Option<CancelTarget> {
        let slot = self.map.lock().get(&client_key).cloned()?;
        slot.lock().clone()
    }
}
