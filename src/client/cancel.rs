//! Maps the BackendKeyData a client was given to the server connection currently serving it, so
//! a CancelRequest arriving on a new connection reaches the right backend.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::protocol::startup::BackendKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub key: BackendKey,
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<BackendKey, CancelTarget>>,
}

impl CancelRegistry {
    pub fn register(&self, client_key: BackendKey, target: CancelTarget) {
        self.map.lock().insert(client_key, target);
    }

    pub fn unregister(&self, client_key: BackendKey) {
        self.map.lock().remove(&client_key);
    }

    pub fn lookup(&self, client_key: BackendKey) -> Option<CancelTarget> {
        self.map.lock().get(&client_key).cloned()
    }
}
