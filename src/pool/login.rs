//! What a login in transaction mode tells its client (the ParameterStatus values a server
//! connection reports once the client's startup settings are applied), remembered per pool so
//! that a login can be answered when every connection of the pool is busy.
//!
//! An entry is only used when no connection is free: whenever one is, the login asks the
//! server and refreshes the entry, so values go stale only while the pool is saturated.

use parking_lot::Mutex;

use crate::client::settings::Settings;

/// Entries kept per pool: drivers send the same startup parameters on every connection, so a
/// pool sees few distinct sets; past this many the oldest is forgotten.
const KEPT: usize = 16;

/// ParameterStatus pairs, in the order the server reported them.
pub type Params = Vec<(String, String)>;

#[derive(Default)]
pub struct LoginParams {
    /// (startup settings, the node was the primary, what the server reported), newest last.
    entries: Mutex<Vec<(Settings, bool, Params)>>,
}

impl LoginParams {
    /// What a connection reported with `settings` applied while its node had this role.
    pub fn get(&self, settings: &Settings, primary: bool) -> Option<Params> {
        self.entries
            .lock()
            .iter()
            .find(|(s, p, _)| s == settings && *p == primary)
            .map(|(_, _, params)| params.clone())
    }

    pub fn remember(&self, settings: &Settings, primary: bool, params: &[(String, String)]) {
        let mut entries = self.entries.lock();
        entries.retain(|(s, p, _)| !(s == settings && *p == primary));
        if entries.len() >= KEPT {
            entries.remove(0);
        }
        entries.push((settings.clone(), primary, params.to_vec()));
    }

    /// Forgets everything (the node was fenced: whatever it reported may not hold).
    pub fn clear(&self) {
        self.entries.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &str) -> Params {
        vec![("application_name".into(), v.into())]
    }

    #[test]
    fn entries_are_per_settings_and_role_and_bounded() {
        let cache = LoginParams::default();
        let a = Settings::from_pairs([("application_name", "a")]);
        let b = Settings::from_pairs([("application_name", "b")]);
        assert_eq!(cache.get(&a, true), None);
        cache.remember(&a, true, &params("a"));
        cache.remember(&b, true, &params("b"));
        assert_eq!(cache.get(&a, true), Some(params("a")));
        assert_eq!(cache.get(&a, false), None, "a replica's answer differs");
        cache.remember(&a, true, &params("a2"));
        assert_eq!(
            cache.get(&a, true),
            Some(params("a2")),
            "refreshed in place"
        );
        for i in 0..KEPT {
            let s = Settings::from_pairs([("application_name", i.to_string().as_str())]);
            cache.remember(&s, true, &params("x"));
        }
        assert_eq!(cache.get(&b, true), None, "the oldest was forgotten");
        assert_eq!(cache.entries.lock().len(), KEPT);
        cache.clear();
        assert_eq!(cache.get(&a, true), None);
    }
}
