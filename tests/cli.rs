//! The `pgpilot` binary's `check` command: effective config, env overrides, named errors.

use std::process::Command;

fn pgpilot(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgpilot"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run pgpilot");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_the_effective_config_with_env_overrides() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgpilot.toml");
    let (ok, out, err) = pgpilot(
        &["check", "--config", example],
        &[
            ("PGPILOT_PROXY__POOL_SIZE", "42"),
            ("PGPILOT_NODES__1__PORT", "6543"),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("pool_size = 42"), "{out}");
    assert!(out.contains("port = 6543"), "{out}");
    assert!(out.contains("probe_interval = \"500ms\""), "{out}");
    assert!(
        !out.contains("app-secret") && !out.contains("change-me"),
        "secrets are masked"
    );
}

#[test]
fn check_names_unknown_keys_and_bad_values() {
    let dir = std::env::temp_dir().join(format!("pgpilot-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    let base = "[[nodes]]\nname = \"pg1\"\nhost = \"h\"\n[[users]]\nname = \"u\"\npassword = \"p\"\n[[databases]]\nname = \"d\"\n";
    std::fs::write(&file, format!("[proxy]\npool_sise = 3\n{base}")).unwrap();
    let (ok, _, err) = pgpilot(&["check", "--config", file.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("pool_sise"), "{err}");

    std::fs::write(
        &file,
        format!("[cluster]\nprobe_interval = \"soon\"\n{base}"),
    )
    .unwrap();
    let (ok, _, err) = pgpilot(&["check", "--config", file.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("invalid duration \"soon\""), "{err}");

    // A bad override is blamed on its variable; foreign PGPILOT_* variables are no error.
    std::fs::write(&file, base).unwrap();
    let (ok, _, err) = pgpilot(
        &["check", "--config", file.to_str().unwrap()],
        &[
            ("PGPILOT_PORT", "tcp://10.0.0.1:6432"),
            ("PGPILOT_PROXY__POOL_SIZE", "lots"),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("environment variable PGPILOT_PROXY__POOL_SIZE"),
        "{err}"
    );
    let (ok, out, err) = pgpilot(
        &["check", "--config", file.to_str().unwrap()],
        &[
            ("PGPILOT_PORT", "tcp://10.0.0.1:6432"),
            ("PGPILOT_PROXY__ADMIN_USERS", "u"),
            ("PGPILOT_CLUSTER__MONITOR_PASSWORD", "12345"),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("admin_users = [\"u\"]"), "{out}");

    let (ok, _, err) = pgpilot(&["check", "--config", "/nonexistent.toml"], &[]);
    assert!(
        !ok && err.contains("cannot read /nonexistent.toml"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
