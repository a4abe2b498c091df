//! The admin console's command language: PgBouncer's (`SHOW POOLS`, `PAUSE db`, ...) and
//! pgpilot's own (`SHOW NODES`, `SWITCHOVER pg2`, ...). Case-insensitive, one command per
//! query, a trailing semicolon allowed.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(String),
    Switchover(Option<String>),
    Promote(String),
    Fence(String),
    Unfence(String),
    /// `SHUTDOWN`, or `SHUTDOWN WAIT_FOR_CLIENTS` (`true`): wait for clients to leave.
    Shutdown(bool),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    Disable(String),
    Enable(String),
    Kill(Option<String>),
    KillClient(u64),
    Reload,
    /// A PgBouncer command pgpilot does not implement (yet): named in the error.
    Unsupported(String),
    Empty,
}

impl Command {
    /// SHOW commands are open to `stats_users`; everything else needs `admin_users`.
    pub fn read_only(&self) -> bool {
        matches!(self, Command::Show(_) | Command::Empty)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

pub fn parse(query: &str) -> Result<Command, ParseError> {
    let text = query.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some(first) = words.first() else {
        return Ok(Command::Empty);
    };
    let verb = first.to_ascii_uppercase();
    let arg = |i: usize| words.get(i).map(|w| unquote(w));
    let one = |name: &str, what: &str| -> Result<String, ParseError> {
        match (arg(1), words.len()) {
            (Some(a), 2) => Ok(a),
            _ => Err(ParseError(format!("usage: {name} <{what}>"))),
        }
    };
    let one_arg = |name: &str| one(name, "node");
    let one_db = |name: &str| one(name, "database");
    match verb.as_str() {
        "SHOW" => match (arg(1), words.len()) {
            (Some(what), 2) => Ok(Command::Show(what.to_ascii_uppercase())),
            _ => Err(ParseError("usage: SHOW <what>; see SHOW HELP".into())),
        },
        "SWITCHOVER" if words.len() <= 2 => Ok(Command::Switchover(arg(1))),
        "PROMOTE" => one_arg("PROMOTE").map(Command::Promote),
        "FENCE" => one_arg("FENCE").map(Command::Fence),
        "UNFENCE" => one_arg("UNFENCE").map(Command::Unfence),
        "SHUTDOWN" if words.len() == 1 => Ok(Command::Shutdown(false)),
        "SHUTDOWN" if words.len() == 2 && words[1].eq_ignore_ascii_case("WAIT_FOR_CLIENTS") => {
            Ok(Command::Shutdown(true))
        }
        "PAUSE" if words.len() <= 2 => Ok(Command::Pause(arg(1))),
        "RESUME" if words.len() <= 2 => Ok(Command::Resume(arg(1))),
        "RECONNECT" if words.len() <= 2 => Ok(Command::Reconnect(arg(1))),
        "KILL" if words.len() <= 2 => Ok(Command::Kill(arg(1))),
        "DISABLE" => one_db("DISABLE").map(Command::Disable),
        "ENABLE" => one_db("ENABLE").map(Command::Enable),
        "KILL_CLIENT" => match arg(1).and_then(|a| a.parse().ok()) {
            Some(id) if words.len() == 2 => Ok(Command::KillClient(id)),
            _ => Err(ParseError(
                "usage: KILL_CLIENT <id from SHOW CLIENTS>".into(),
            )),
        },
        "RELOAD" if words.len() == 1 => Ok(Command::Reload),
        "SUSPEND" | "WAIT_CLOSE" | "SET" | "SHUTDOWN" => Ok(Command::Unsupported(verb)),
        _ => Err(ParseError(format!(
            "invalid command \"{}\"; see SHOW HELP",
            first
        ))),
    }
}

fn unquote(word: &str) -> String {
    word.trim_matches(|c| c == '"' || c == '\'').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse(" show pools ;"), Ok(Command::Show("POOLS".into())));
        assert_eq!(parse("SWITCHOVER"), Ok(Command::Switchover(None)));
        assert_eq!(
            parse("switchover \"pg2\""),
            Ok(Command::Switchover(Some("pg2".into())))
        );
        assert_eq!(parse("FENCE pg3"), Ok(Command::Fence("pg3".into())));
        assert_eq!(parse(""), Ok(Command::Empty));
        assert_eq!(parse("pause app"), Ok(Command::Pause(Some("app".into()))));
        assert_eq!(parse("KILL_CLIENT 7"), Ok(Command::KillClient(7)));
        assert!(parse("KILL_CLIENT x").is_err());
        assert!(parse("DISABLE").is_err());
        assert_eq!(parse("suspend"), Ok(Command::Unsupported("SUSPEND".into())));
        assert!(parse("PROMOTE").is_err());
        assert!(parse("SHOW").is_err());
        assert!(parse("DROP TABLE x").is_err());
        assert!(!parse("SHUTDOWN").unwrap().read_only());
        assert_eq!(
            parse("shutdown wait_for_clients"),
            Ok(Command::Shutdown(true))
        );
        assert!(parse("SHOW NODES").unwrap().read_only());
    }
}
