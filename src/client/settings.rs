//! Session settings a client has made (startup parameters and `SET` outside `SET LOCAL`), and
//! the statements that bring a pooled server connection in line with them. A server connection
//! remembers what clients applied, so clients with the same settings cost no round trip.

/// Settings as `(name, statement)` pairs, name lowercased, in the order they were made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    items: Vec<(String, String)>,
}

impl Settings {
    /// Settings from startup parameters: `SET "name" = 'value'` for each.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut s = Settings::default();
        for (name, value) in pairs {
            let statement = format!(
                "SET \"{}\" = '{}'",
                name.replace('"', "\"\""),
                value.replace('\'', "''")
            );
            s.set(name, statement);
        }
        s
    }

    pub fn set(&mut self, name: &str, statement: String) {
        let name = name.to_ascii_lowercase();
        match self.items.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = statement,
            None => self.items.push((name, statement)),
        }
    }

    pub fn reset(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.items.retain(|(n, _)| *n != name);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// SQL that turns a connection with `applied` settings into one with `self`'s, or `None`
    /// when they already match.
    pub fn diff_from(&self, applied: &Settings) -> Option<String> {
        let mut sql = String::new();
        for (name, _) in &applied.items {
            if !self.items.iter().any(|(n, _)| n == name) {
                sql.push_str(&format!("RESET \"{}\";", name.replace('"', "\"\"")));
            }
        }
        for (name, statement) in &self.items {
            if !applied
                .items
                .iter()
                .any(|(n, s)| n == name && s == statement)
            {
                sql.push_str(statement);
                sql.push(';');
            }
        }
        (!sql.is_empty()).then_some(sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sets_what_differs_and_resets_what_is_extra() {
        let mut mine = Settings::from_pairs([("application_name", "app")]);
        mine.set("search_path", "SET search_path = a".into());
        let theirs = Settings::from_pairs([("application_name", "other"), ("TimeZone", "UTC")]);
        let sql = mine.diff_from(&theirs).unwrap();
        assert_eq!(
            sql,
            "RESET \"timezone\";SET \"application_name\" = 'app';SET search_path = a;"
        );
        assert_eq!(mine.diff_from(&mine.clone()), None);
        mine.reset("SEARCH_PATH");
        assert_eq!(mine.len(), 1);
        assert_eq!(
            Settings::from_pairs([("x", "it's")]).items[0].1,
            "SET \"x\" = 'it''s'"
        );
    }
}
