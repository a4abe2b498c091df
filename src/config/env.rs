//! Environment overrides: `PGPILOT_SECTION__KEY=value` replaces `key` in `[section]`;
//! `PGPILOT_NODES__0__PORT=5433` indexes arrays of tables.

use toml::{Table, Value};

pub const PREFIX: &str = "PGPILOT_";

/// Applies every override in `vars` to the parsed file. Returns the names that were applied.
pub fn apply_overrides(
    root: &mut Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, String> {
    let mut applied = Vec::new();
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("environment variable {name}: empty key segment"));
        }
        set_path(root, &segments, &raw).map_err(|e| format!("environment variable {name}: {e}"))?;
        applied.push(name);
    }
    Ok(applied)
}

fn set_path(table: &mut Table, segments: &[String], raw: &str) -> Result<(), String> {
    match segments {
        [] => Err("no key".into()),
        [last] => {
            let value = convert(raw, table.get(last.as_str()));
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let child = table
                .entry(first.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            set_in_value(child, first, rest, raw)
        }
    }
}

fn set_in_value(value: &mut Value, name: &str, rest: &[String], raw: &str) -> Result<(), String> {
    match value {
        Value::Table(t) => set_path(t, rest, raw),
        Value::Array(items) => {
            let (idx, rest) = rest
                .split_first()
                .ok_or_else(|| format!("\"{name}\" needs an index"))?;
            let i: usize = idx
                .parse()
                .map_err(|_| format!("\"{idx}\" is not an array index"))?;
            let elem = items
                .get_mut(i)
                .ok_or_else(|| format!("index {i} is past the end of \"{name}\""))?;
            if rest.is_empty() {
                *elem = convert(raw, Some(elem));
                Ok(())
            } else {
                set_in_value(elem, idx, rest, raw)
            }
        }
        _ => Err(format!("\"{name}\" is not a table")),
    }
}

/// Interprets a raw environment string, guided by the type of the value it replaces.
fn convert(raw: &str, existing: Option<&Value>) -> Value {
    match existing {
        Some(Value::String(_)) => Value::String(raw.to_owned()),
        Some(Value::Array(_)) if !raw.trim_start().starts_with('[') => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ),
        _ => format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(raw.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn overrides_scalars_lists_and_array_elements() {
        let mut t: Table = "[proxy]\nlisten = \"1.2.3.4:1\"\nadmin_users = [\"a\"]\n[[nodes]]\nname = \"pg1\"\nport = 1\n"
            .parse()
            .unwrap();
        apply_overrides(
            &mut t,
            vars(&[
                ("PGPILOT_PROXY__LISTEN", "127.0.0.1:7000"),
                ("PGPILOT_PROXY__POOL_SIZE", "7"),
                ("PGPILOT_PROXY__ADMIN_USERS", "admin,ops"),
                ("PGPILOT_NODES__0__PORT", "5433"),
                ("PGPILOT_CLUSTER__PROBE_INTERVAL", "250ms"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(t["proxy"]["listen"].as_str(), Some("127.0.0.1:7000"));
        assert_eq!(t["proxy"]["pool_size"].as_integer(), Some(7));
        assert_eq!(t["proxy"]["admin_users"].as_array().unwrap().len(), 2);
        assert_eq!(t["nodes"][0]["port"].as_integer(), Some(5433));
        assert_eq!(t["cluster"]["probe_interval"].as_str(), Some("250ms"));
    }

    #[test]
    fn bad_index_is_reported() {
        let mut t: Table = "[[nodes]]\nname = \"pg1\"\n".parse().unwrap();
        let err = apply_overrides(&mut t, vars(&[("PGPILOT_NODES__3__PORT", "1")])).unwrap_err();
        assert!(err.contains("PGPILOT_NODES__3__PORT"), "{err}");
    }
}
