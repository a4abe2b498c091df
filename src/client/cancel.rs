//! Maps the BackendKeyData a client was given to the server connection currently serving it, so
//! a CancelRequest arriving on a new connection reaches the right backend.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::protocol::startup::BackendKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub key: BackendKey,
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
