//! The files in deploy/ are checked by the tools that will read them (HAProxy, bash, systemd)
//! where those are installed, and parsed as YAML otherwise, so a broken edit fails here rather
//! than at 3 a.m. on a real host. HAProxy is required: its absence fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    let mut v: Value =
        serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"));
    // Compose files share settings through `<<:` merge keys; resolve them as Compose does.
    v.apply_merge()
        .unwrap_or_else(|e| panic!("{rel}: merge keys: {e}"));
    v
}

fn tool_exists(name: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn haproxy_accepts_the_balancer_config() {
    assert!(
        tool_exists("haproxy"),
        "haproxy is not installed; install it: apt-get install -y haproxy"
    );
    let cfg = deploy_dir().join("haproxy.cfg");
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .expect("run haproxy -c");
    assert!(
        out.status.success(),
        "haproxy -c -f {} failed:\n{}{}",
        cfg.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = read("haproxy.cfg");
    for needle in [
        "send-proxy-v2",
        "balance leastconn",
        "/readyz",
        "timeout tunnel",
    ] {
        assert!(text.contains(needle), "haproxy.cfg lacks {needle:?}");
    }
}

/// Seconds in an HAProxy time value ("1s", "500ms", "2m").
fn haproxy_secs(value: &str) -> f64 {
    let value = value.trim_matches('"');
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| value.split_at(i))
        .unwrap_or((value, "ms"));
    let n: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("time value {value:?}"));
    match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        other => panic!("unit {other:?} in {value:?}"),
    }
}

/// The word after `key` on the first line of haproxy.cfg that has it (env defaults resolved).
fn haproxy_setting(text: &str, line_start: &str, key: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("haproxy.cfg has no line starting {line_start:?}"));
    let mut words = line.split_whitespace();
    words
        .position(|w| w == key)
        .and_then(|_| words.next())
        .map(|w| {
            // "${CHECK_INTER-1s}" -> 1s: what HAProxy uses when the variable is unset.
            w.trim_matches('"')
                .strip_prefix("${")
                .and_then(|v| v.strip_suffix('}'))
                .and_then(|v| v.split_once('-'))
                .map_or(w.trim_matches('"'), |(_, default)| default)
                .to_string()
        })
        .unwrap_or_else(|| panic!("{line:?} lacks {key}"))
}

#[test]
fn haproxy_takes_a_frozen_node_out_before_its_clients_give_up() {
    let text = read("haproxy.cfg");
    let inter = haproxy_secs(&haproxy_setting(&text, "default-server", "inter"));
    let fall: f64 = haproxy_setting(&text, "default-server", "fall")
        .parse()
        .expect("fall");
    let check = haproxy_secs(&haproxy_setting(&text, "timeout check", "check"));
    // A frozen node accepts the check's connection and never answers: each failed check lasts
    // `timeout check`, with `inter` before each.
    let out_after = fall * (inter + check);
    let sdk = messenger_protocol::client::ConnectOptions::new(
        "127.0.0.1:7443",
        messenger_protocol::client::Trust::CaFile("ca.pem".into()),
    );
    let clients_give_up = sdk.ping_interval.min(sdk.connect_timeout).as_secs_f64();
    assert!(
        out_after < clients_give_up / 2.0,
        "a frozen node is out after up to {out_after} s (inter {inter} s, fall {fall}, timeout \
         check {check} s); clients notice after {clients_give_up} s at the earliest"
    );
    assert!(
        text.contains("${CHECK_INTER-"),
        "tests override the interval with CHECK_INTER"
    );
}

#[test]
fn every_local_cluster_variable_is_documented() {
    let script = read("local-cluster");
    let docs = std::fs::read_to_string(deploy_dir().join("../docs/OPERATIONS.md"))
        .expect("docs/OPERATIONS.md");
    let mut variables: Vec<&str> = script
        .match_indices("MESSENGER_CLUSTER_")
        .map(|(i, _)| {
            let rest = &script[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    variables.sort_unstable();
    variables.dedup();
    assert!(variables.len() >= 7, "{variables:?}");
    for variable in variables {
        assert!(
            docs.contains(variable),
            "docs/OPERATIONS.md does not mention {variable}"
        );
    }
    assert!(docs.contains("## Local cluster"));
}

#[test]
fn the_local_cluster_script_parses() {
    let script = deploy_dir().join("local-cluster");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("run bash -n");
    assert!(
        out.status.success(),
        "bash -n {}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = read("local-cluster");
    assert!(text.contains("set -euo pipefail"), "strict mode");
    assert!(
        text.contains("--proxy-protocol true"),
        "nodes expect HAProxy's header"
    );
}

fn environment_of(service: &Value) -> &serde_norway::Mapping {
    service
        .get("environment")
        .and_then(Value::as_mapping)
        .expect("environment as a mapping")
}

#[test]
fn compose_runs_three_nodes_with_shared_store_and_redis_behind_haproxy() {
    let compose = yaml("docker-compose.yml");
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services");
    for name in ["postgres", "redis", "haproxy", "node1", "node2", "node3"] {
        assert!(
            services.contains_key(name),
            "docker-compose.yml has no service {name}"
        );
    }
    for (i, name) in ["node1", "node2", "node3"].iter().enumerate() {
        let env = environment_of(&services[*name]);
        let get = |k: &str| {
            env.get(k)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{name} lacks {k}"))
        };
        assert_eq!(get("MESSENGER_STORE_BACKEND"), "postgres", "{name}");
        assert!(
            get("MESSENGER_POSTGRES_URL").contains("@postgres:5432/"),
            "{name} uses the compose postgres"
        );
        assert!(
            get("MESSENGER_REDIS_URL").starts_with("redis://redis:"),
            "{name} uses the compose redis"
        );
        assert_eq!(get("MESSENGER_PROXY_PROTOCOL"), "true", "{name}");
        assert_eq!(get("MESSENGER_NODE_ID"), *name);
        let haproxy_env = environment_of(&services["haproxy"]);
        let addr_key = format!("NODE{}_ADDR", i + 1);
        assert_eq!(
            haproxy_env.get(addr_key.as_str()).and_then(Value::as_str),
            Some(format!("{name}:7443").as_str()),
            "haproxy reaches {name} by its service name"
        );
    }
    let volumes = services["haproxy"]
        .get("volumes")
        .and_then(Value::as_sequence)
        .expect("haproxy volumes");
    assert!(
        volumes
            .iter()
            .filter_map(Value::as_str)
            .any(|v| v.starts_with("./haproxy.cfg:")),
        "compose mounts the one deploy/haproxy.cfg"
    );
}

#[test]
fn the_deployment_manager_config_imports_the_template() {
    let config = yaml("gcp/messenger-deployment.yaml");
    let imports = config
        .get("imports")
        .and_then(Value::as_sequence)
        .expect("imports");
    let paths: Vec<&str> = imports
        .iter()
        .filter_map(|i| i.get("path").and_then(Value::as_str))
        .collect();
    assert!(paths.contains(&"messenger.jinja"), "imports: {paths:?}");
    for p in &paths {
        assert!(
            deploy_dir().join("gcp").join(p).is_file(),
            "imported file {p} exists"
        );
    }
    let resources = config
        .get("resources")
        .and_then(Value::as_sequence)
        .expect("resources");
    assert!(
        resources
            .iter()
            .any(|r| r.get("type").and_then(Value::as_str) == Some("messenger.jinja")),
        "a resource uses the template"
    );
    let schema = yaml("gcp/messenger.jinja.schema");
    assert!(schema.get("properties").is_some(), "schema has properties");

    let template = read("gcp/messenger.jinja");
    for needle in [
        "ipv4Enabled: false",
        "connectMode: PRIVATE_SERVICE_ACCESS",
        "servicenetworking",
        "autoHealingPolicies",
        "/readyz",
        "portRange: \"7443\"",
    ] {
        assert!(
            template.contains(needle),
            "messenger.jinja lacks {needle:?}"
        );
    }
}

const UNIT_KEYS: &[&str] = &[
    "User=messenger",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ReadWritePaths=/var/lib/messenger",
    "LimitNOFILE=1048576",
    "EnvironmentFile=-/etc/messenger/env",
    "KillSignal=SIGTERM",
    "TimeoutStopSec=",
    "ExecStart=/usr/local/bin/messengerd",
];

#[test]
fn the_systemd_unit_is_valid_and_hardened() {
    let unit = read("messengerd.service");
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for key in UNIT_KEYS {
        assert!(
            lines.iter().any(|l| l.starts_with(key)),
            "messengerd.service lacks {key}"
        );
    }
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(
            lines.contains(&section),
            "messengerd.service lacks {section}"
        );
    }
    if !tool_exists("systemd-analyze") {
        return;
    }
    // verify insists that ExecStart exists: point it at the binary this test run built.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("messengerd.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/messengerd",
            env!("CARGO_BIN_EXE_messengerd"),
        ),
    )
    .expect("write unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 on unknown keys but names the file in a warning: treat those as failures.
    let about_our_unit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("messengerd.service"))
        .collect();
    assert!(
        out.status.success() && about_our_unit.is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

/// The admin port (no authentication) must never be reachable from outside the private
/// network: no file publishes it on a host or opens it to arbitrary sources.
#[test]
fn no_deploy_file_publishes_the_admin_port() {
    const ADMIN: &str = "7480";

    // Compose: no service publishes it (nodes publish nothing at all).
    let compose = yaml("docker-compose.yml");
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services");
    for (name, service) in services {
        let name = name.as_str().unwrap_or("?");
        let ports: Vec<String> = service
            .get("ports")
            .and_then(Value::as_sequence)
            .map(|ps| {
                ps.iter()
                    .map(|p| match p {
                        Value::String(s) => s.clone(),
                        other => format!("{other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if name.starts_with("node") {
            assert!(ports.is_empty(), "{name} publishes {ports:?}");
        }
        assert!(
            !ports.iter().any(|p| p.contains(ADMIN)),
            "{name} publishes the admin port: {ports:?}"
        );
    }

    // Docker: the image keeps it on the container's loopback and does not EXPOSE it.
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains("MESSENGER_ADMIN_LISTEN=127.0.0.1:7480"),
        "the image's admin port is not on loopback"
    );
    for line in dockerfile.lines().filter(|l| l.starts_with("EXPOSE")) {
        assert!(!line.contains(ADMIN), "Dockerfile: {line}");
    }

    // systemd: the unit itself never moves it to all interfaces.
    let unit = read("messengerd.service");
    assert!(
        !unit
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("MESSENGER_ADMIN_LISTEN")),
        "messengerd.service sets the admin address"
    );

    // Cloud: every firewall rule that opens the admin port admits only Google's checkers.
    let health_checkers = [
        "35.191.0.0/16",
        "130.211.0.0/22",
        "209.85.152.0/22",
        "209.85.204.0/22",
    ];
    let template = read("gcp/messenger.jinja");
    let mut opening = 0;
    for resource in template.split("\n- name: ").skip(1) {
        // Comments may name the port; only the rule itself counts.
        let resource: String = resource
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        if !resource.contains("type: compute.v1.firewall") || !resource.contains(ADMIN) {
            continue;
        }
        opening += 1;
        let sources: Vec<&str> = resource
            .split("sourceRanges:")
            .nth(1)
            .map(|rest| {
                rest.lines()
                    .skip(1)
                    .map(str::trim)
                    .take_while(|l| l.starts_with("- "))
                    .map(|l| l.trim_start_matches("- "))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !sources.is_empty() && sources.iter().all(|s| health_checkers.contains(s)),
            "a firewall rule opens the admin port to {sources:?}:\n{resource}"
        );
    }
    assert_eq!(
        opening, 1,
        "exactly the health-check rule opens the admin port"
    );
}
