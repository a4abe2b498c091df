use super::*;

const MINIMAL: &str = r#"
[[nodes]]
name = "pg1"
host = "127.0.0.1"

[[users]]
name = "app"
password = "secret"

[[databases]]
name = "app"
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.proxy.listen.port(), 6432);
    assert_eq!(c.cluster.probe_interval.0, Duration::from_millis(500));
    assert_eq!(c.nodes[0].port, 5432);
    assert_eq!(c.users[0].backend_password(), Some("secret"));
}

#[test]
fn unknown_keys_are_named() {
    let text = format!("{MINIMAL}\n[proxy]\nlisten_port = 5\n");
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("listen_port"), "{err}");
    let text = MINIMAL.replace("host =", "hots = \"x\"\nhost =");
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("hots"), "{err}");
}

#[test]
fn env_overrides_apply_and_bad_values_are_reported() {
    let vars = vec![
        ("PGPILOT_PROXY__POOL_SIZE".to_string(), "3".to_string()),
        (
            "PGPILOT_CLUSTER__FAILOVER_TIMEOUT".to_string(),
            "1500ms".to_string(),
        ),
    ];
    let c = Config::from_toml_with_env(MINIMAL, Path::new("t"), vars).unwrap();
    assert_eq!(c.proxy.pool_size, 3);
    assert_eq!(c.cluster.failover_timeout.0, Duration::from_millis(1500));
    let vars = vec![(
        "PGPILOT_CLUSTER__PROBE_INTERVAL".to_string(),
        "fast".to_string(),
    )];
    let err = Config::from_toml_with_env(MINIMAL, Path::new("t"), vars).unwrap_err();
    assert!(err.to_string().contains("probe_interval"), "{err}");
}

#[test]
fn validation_rejects_inconsistent_settings() {
    let cases = [
        (
            MINIMAL.replace("[[nodes]]\nname = \"pg1\"\nhost = \"127.0.0.1\"", ""),
            "nodes",
        ),
        (format!("{MINIMAL}[proxy]\npool_size = 0\n"), "pool_size"),
        (
            format!("{MINIMAL}[proxy]\nclient_tls_mode = \"require\"\n"),
            "client_tls_cert",
        ),
        (
            format!("{MINIMAL}[proxy]\nserver_tls_mode = \"verify-full\"\n"),
            "server_tls_ca",
        ),
        (
            MINIMAL.replace(
                "password = \"secret\"",
                "password = \"SCRAM-SHA-256$4096:x$y:z\"",
            ),
            "server_password",
        ),
        (
            MINIMAL.replace(
                "[[databases]]\nname = \"app\"",
                "[[databases]]\nname = \"pgbouncer\"",
            ),
            "reserved",
        ),
        (
            format!("{MINIMAL}[[databases]]\nname = \"app\"\n"),
            "duplicate",
        ),
    ];
    for (text, needle) in cases {
        let err = Config::from_toml(&text).expect_err(needle).to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn masked_output_hides_passwords_and_parses_back() {
    let c = Config::from_toml(MINIMAL).unwrap();
    let out = c.to_masked_toml();
    assert!(!out.contains("secret"));
    assert!(out.contains("probe_interval = \"500ms\""), "{out}");
    Config::from_toml(&out).unwrap();
}

#[test]
fn failover_settings_are_checked() {
    let err = Config::from_toml(&format!(
        "{MINIMAL}[cluster]\nprobe_timeout = \"3s\"\nfailover_timeout = \"3s\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("probe_timeout"), "{err}");
    let etcd = format!("{MINIMAL}[cluster]\ncoordinator = \"etcd\"\netcd_lease_ttl = \"1s\"\n");
    let err = Config::from_toml(&etcd).unwrap_err().to_string();
    if cfg!(feature = "etcd") {
        assert!(err.contains("etcd_lease_ttl"), "{err}");
    } else {
        assert!(err.contains("`etcd` feature"), "{err}");
    }
}
