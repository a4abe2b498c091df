//! Environment overrides: `PGPILOT_SECTION__KEY=value` replaces `key` in `[section]`;
//! `PGPILOT_NODES__0__PORT=5433` indexes arrays of tables. A value takes the type of the
//! setting it replaces (the file's value, else pgpilot's default), and is a string where
//! neither says (every optional setting is a string): `12345` for a password stays text.
//! Variables without `__` (`PGPILOT_PORT` from a Kubernetes Service, `PGPILOT_PG_BIN`) are
//! not settings: they are ignored and named to the caller.

use toml::{Table, Value};

pub const PREFIX: &str = "PGPILOT_";

/// What applying the environment did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// (variable, the file with every override up to and including it).
    pub steps: Vec<(String, Table)>,
    /// `PGPILOT_*` variables that are not of the `SECTION__KEY` form.
    pub ignored: Vec<String>,
}

/// Applies every override in `vars` to the parsed file, typed by `schema` (every setting
/// with a value of its type, see `Config::schema`). Keeps the table after each step, so that
/// a value the configuration then rejects is blamed on its variable.
pub fn apply_overrides(
    root: &mut Table,
    schema: &Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Applied, String> {
    let mut applied = Applied::default();
    let mut vars: Vec<(String, String)> = vars.into_iter().collect();
    vars.sort();
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if !path.contains("__") {
            applied.ignored.push(name);
            continue;
        }
        let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("environment variable {name}: empty key segment"));
        }
        set_path(root, Some(schema), &segments, &raw)
            .map_err(|e| format!("environment variable {name}: {e}"))?;
        applied.steps.push((name, root.clone()));
    }
    Ok(applied)
}

fn set_path(
    table: &mut Table,
    schema: Option<&Table>,
    segments: &[String],
    raw: &str,
) -> Result<(), String> {
    match segments {
        [] => Err("no key".into()),
        [last] => {
            let like = table
                .get(last.as_str())
                .or_else(|| schema.and_then(|s| s.get(last.as_str())));
            let value = convert(raw, like);
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let sub = schema.and_then(|s| s.get(first.as_str()));
            let child = table
                .entry(first.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            set_in_value(child, sub, first, rest, raw)
        }
    }
}

fn set_in_value(
    value: &mut Value,
    schema: Option<&Value>,
    name: &str,
    rest: &[String],
    raw: &str,
) -> Result<(), String> {
    match value {
        Value::Table(t) => set_path(t, schema.and_then(Value::as_table), rest, raw),
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
            // Every element has the shape of the schema's example element.
            let example = schema.and_then(Value::as_array).and_then(|a| a.first());
            if rest.is_empty() {
                *elem = convert(raw, Some(elem));
                Ok(())
            } else {
                set_in_value(elem, example, idx, rest, raw)
            }
        }
        _ => Err(format!("\"{name}\" is not a table")),
    }
}

/// Interprets a raw environment string as the type of `like` (the value it replaces, or the
/// setting's default); a string when there is none.
fn convert(raw: &str, like: Option<&Value>) -> Value {
    match like {
        None | Some(Value::String(_)) => Value::String(raw.to_owned()),
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

    fn schema() -> Table {
        crate::config::Config::schema()
    }

    #[test]
    fn overrides_scalars_lists_and_array_elements() {
        let mut t: Table = "[proxy]\nlisten = \"1.2.3.4:1\"\nadmin_users = [\"a\"]\n[[nodes]]\nname = \"pg1\"\nport = 1\n"
            .parse()
            .unwrap();
        apply_overrides(
            &mut t,
            &schema(),
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
        let err = apply_overrides(&mut t, &schema(), vars(&[("PGPILOT_NODES__3__PORT", "1")]))
            .unwrap_err();
        assert!(err.contains("PGPILOT_NODES__3__PORT"), "{err}");
    }

    #[test]
    fn values_are_typed_by_the_setting_and_foreign_variables_are_ignored() {
        // Nothing in the file: the type comes from the setting.
        let mut t: Table = "[[nodes]]\nname = \"pg1\"\nhost = \"h\"\n".parse().unwrap();
        let applied = apply_overrides(
            &mut t,
            &schema(),
            vars(&[
                ("PGPILOT_PROXY__ADMIN_USERS", "admin,ops"),
                ("PGPILOT_CLUSTER__MONITOR_PASSWORD", "12345"),
                ("PGPILOT_PROXY__POOL_SIZE", "7"),
                ("PGPILOT_CLUSTER__SYNCHRONOUS", "true"),
                ("PGPILOT_NODES__0__PRIORITY", "50"),
                ("PGPILOT_PORT", "tcp://10.0.0.1:6432"),
                ("PGPILOT_SERVICE_HOST", "10.0.0.1"),
                ("PGPILOT_PG_BIN", "/usr/lib/postgresql/15/bin"),
            ]),
        )
        .unwrap();
        let admins: Vec<&str> = t["proxy"]["admin_users"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(admins, ["admin", "ops"]);
        assert_eq!(t["cluster"]["monitor_password"].as_str(), Some("12345"));
        assert_eq!(t["proxy"]["pool_size"].as_integer(), Some(7));
        assert_eq!(t["cluster"]["synchronous"].as_bool(), Some(true));
        assert_eq!(t["nodes"][0]["priority"].as_integer(), Some(50));
        assert_eq!(
            applied.ignored,
            ["PGPILOT_PG_BIN", "PGPILOT_PORT", "PGPILOT_SERVICE_HOST"]
        );
        assert_eq!(applied.steps.len(), 5);
    }
}
