//! libpq keyword/value connection strings (`host=a port=5432 password='it''s'`): read from a
//! replica's `primary_conninfo` and written back with a new host and port, so credentials,
//! TLS settings and everything else the operator put there are kept; and read from what a
//! WAL receiver reports, for the name it streams under.

/// Parses `key=value` pairs; values may be single-quoted with `\'` and `\\` escapes.
pub fn parse(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "missing \"=\" after \"{key}\" in connection string"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or("unterminated escape")?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err("unterminated quoted value in connection string".into()),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().ok_or("unterminated escape")?);
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Formats pairs, every value quoted.
pub fn format(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `conninfo` with `host`, `port` and `application_name` replaced (added when missing);
/// `hostaddr` is dropped since it would override the new host.
pub fn repoint(
    conninfo: &str,
    host: &str,
    port: u16,
    application_name: &str,
) -> Result<String, String> {
    let mut pairs: Vec<(String, String)> = parse(conninfo)?
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "host" | "hostaddr" | "port" | "application_name"
            )
        })
        .collect();
    pairs.push(("host".into(), host.into()));
    pairs.push(("port".into(), port.to_string()));
    pairs.push(("application_name".into(), application_name.into()));
    Ok(format(&pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_quotes_and_escapes() {
        let s =
            r"user=postgres password='it\'s a \\secret' host=10.0.0.1 port = 5432 sslmode=prefer";
        let pairs = parse(s).unwrap();
        assert_eq!(pairs[1], ("password".into(), r"it's a \secret".into()));
        assert_eq!(pairs[3], ("port".into(), "5432".into()));
        assert_eq!(parse(&format(&pairs)).unwrap(), pairs);
    }

    #[test]
    fn repoint_keeps_credentials_and_replaces_the_target() {
        let s = "user=rep password=pw hostaddr=10.0.0.1 host=a port=1 application_name=x";
        let out = repoint(s, "b", 2, "pg3").unwrap();
        let pairs = parse(&out).unwrap();
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            (
                get("user"),
                get("password"),
                get("host"),
                get("port"),
                get("hostaddr")
            ),
            (Some("rep"), Some("pw"), Some("b"), Some("2"), None)
        );
        assert_eq!(get("application_name"), Some("pg3"));
        assert!(parse("host='open").is_err());
        assert!(parse("novalue").is_err());
    }
}
