//! Operator hooks (`rejoin_command`, `demote_command`): a shell command line with `{name}`
//! placeholders, each value shell-quoted, run with a time limit; its output goes to the log.

use std::process::Stdio;
use std::time::Duration;

use crate::cluster::NodeStatus;

/// Placeholder values for a hook acting on `node` while `primary` is the elected primary.
pub fn variables(node: &NodeStatus, primary: Option<&NodeStatus>) -> Vec<(&'static str, String)> {
    vec![
        ("node", node.name.clone()),
        ("host", node.host.clone()),
        ("port", node.port.to_string()),
        ("data_dir", node.data_dir.clone().unwrap_or_default()),
        (
            "primary_node",
            primary.map(|p| p.name.clone()).unwrap_or_default(),
        ),
        (
            "primary_host",
            primary.map(|p| p.host.clone()).unwrap_or_default(),
        ),
        (
            "primary_port",
            primary.map(|p| p.port.to_string()).unwrap_or_default(),
        ),
    ]
}

/// Replaces `{name}` placeholders with shell-quoted values.
pub fn expand(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("{{{name}}}"), &shell_quote(value));
    }
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `sh -c command`; Ok with its output when it exits 0 within `limit`.
pub async fn run(command: &str, limit: Duration) -> Result<String, String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| format!("did not finish within {limit:?}"))?
        .map_err(|e| e.to_string())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{}: {}", out.status, text.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_quoted() {
        let vars = [
            ("node", "pg1".to_owned()),
            ("data_dir", "/d/it's here".to_owned()),
        ];
        assert_eq!(
            expand("rejoin {node} {data_dir} {other}", &vars),
            r"rejoin 'pg1' '/d/it'\''s here' {other}"
        );
    }

    #[tokio::test]
    async fn runs_and_reports_failure() {
        assert_eq!(
            run("echo hi", Duration::from_secs(5)).await.unwrap(),
            "hi\n"
        );
        let err = run("echo no >&2; exit 3", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("no") && err.contains('3'), "{err}");
        assert!(run("sleep 5", Duration::from_millis(100)).await.is_err());
    }
}
