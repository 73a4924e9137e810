//! Monitoring with real tools (Debian's `prometheus` package): the rules pass `promtool check
//! rules` and their unit tests (`tests/monitoring/*.test.yaml`: each alert fires on series that
//! break it and stays silent on ones that do not); the PrometheusRule holds the same groups as
//! the plain rules file; and a real Prometheus scraping a real agent, while this test drives a
//! known mix of attaches through the real plugin, records exactly that mix, and answers every
//! query of the Grafana dashboard with data.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn monitoring() -> PathBuf {
    repo().join("manifests/monitoring")
}

fn yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("promtool (Debian package prometheus; `make deps` installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests_and_the_component_ships_them() {
    let checked = promtool(&["check", "rules", "manifests/monitoring/sluice.rules.yaml"]);
    assert!(checked.contains("SUCCESS: 15 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "tests/monitoring/sluice.rules.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test that fires it and one that does not.
    let rules = yaml(&monitoring().join("sluice.rules.yaml"));
    let tests = std::fs::read_to_string(repo().join("tests/monitoring/sluice.rules.test.yaml"))
        .expect("rule tests");
    let alerts: Vec<&str> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(alerts.len(), 9, "{alerts:?}");
    for alert in &alerts {
        let cases: Vec<&str> = tests
            .split(&format!("- alertname: {alert}\n"))
            .skip(1)
            .map(|rest| rest.split("- alertname:").next().unwrap_or(rest))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no test where it stays silent"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{alert}: no test where it fires"
        );
    }
    // The PrometheusRule is the same groups.
    let operator = yaml(&monitoring().join("prometheusrule.yaml"));
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["spec"]["groups"], rules["groups"]);
    // The component: off by default (the install does not list it), ships rules, the
    // PodMonitor and the dashboard ConfigMap for Grafana's sidecar.
    let component = yaml(&monitoring().join("kustomization.yaml"));
    assert_eq!(component["kind"], "Component");
    let install = yaml(&repo().join("manifests/kustomization.yaml"));
    assert!(!install.to_string().contains("monitoring"));
    assert_eq!(
        component["resources"],
        serde_json::json!(["prometheusrule.yaml", "podmonitor.yaml"])
    );
    let generator = &component["configMapGenerator"][0];
    assert_eq!(generator["files"][0], "sluice-dashboard.json");
    assert_eq!(generator["options"]["labels"]["grafana_dashboard"], "1");
    let podmonitor = yaml(&monitoring().join("podmonitor.yaml"));
    assert_eq!(podmonitor["spec"]["jobLabel"], "app.kubernetes.io/name");
    assert_eq!(
        podmonitor["spec"]["podMetricsEndpoints"][0]["port"],
        "metrics"
    );
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over HTTP/1.1; the body.
fn get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{head}\n{body}"));
    }
    Ok(body.to_owned())
}

struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    /// Prometheus scraping `target` every second as job `sluice-agent`, with the rules file
    /// (its recording group evaluated every second instead of every 30 s).
    fn start(target: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let rules = std::fs::read_to_string(monitoring().join("sluice.rules.yaml"))
            .expect("rules")
            .replace("interval: 30s", "interval: 1s");
        std::fs::write(dir.join("sluice.rules.yaml"), rules).expect("rules copy");
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: sluice-agent\n    static_configs:\n      - targets: ['{target}']\n",
                dir.join("sluice.rules.yaml").display()
            ),
        )
        .expect("config");
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus)");
        let me = Prometheus { child, port, dir };
        wait_for("Prometheus ready", scaled(Duration::from_secs(30)), || {
            get(port, "/-/ready").is_ok()
        });
        me
    }

    /// An instant query's result vector.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let body = get(self.port, &format!("/api/v1/query?query={}", encode(expr)))?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(body);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a query returning one sample.
    fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr).ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_real_prometheus_records_the_attaches_the_test_made_and_answers_every_dashboard_query() {
    require_root();
    let agent = Agent::start("prometheus");
    let url = agent.metrics_url();
    let target = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let prom = Prometheus::start(&target);
    // A few scrapes of the agent at rest first: every counter is there at 0.
    wait_for("three scrapes", scaled(Duration::from_secs(30)), || {
        prom.value(r#"count_over_time(up{job="sluice-agent"}[1m])"#)
            .is_some_and(|n| n >= 3.0)
    });
    assert_eq!(prom.value(r#"up{job="sluice-agent"}"#), Some(1.0));

    // The traffic: 6 pods captured, 2 refused with code 7 (an invalid annotation).
    let mut namespaces = Vec::new();
    for i in 0..8 {
        let ns = Netns::new(&format!("prom{i}"));
        let mut ann = vec![("sluice.dev/redirect", "enabled")];
        if i >= 6 {
            ann.push(("sluice.dev/outbound-port", "http"));
        }
        let stdin = conf(
            "1.0.0",
            &agent.socket_str(),
            &ann,
            Some(&prev_result("1.0.0")),
        );
        let run = cni("ADD", &format!("prom-{i}"), &ns.path(), &stdin);
        if i < 6 {
            assert_eq!(run.exit, 0, "{run:?}");
        } else {
            assert_eq!(run.error_code(), 7, "{run:?}");
        }
        namespaces.push(ns);
    }

    // The recording rules say what happened: 6 of 8 succeeded, the failures are code 7.
    let started = Instant::now();
    wait_for(
        "the success ratio recorded",
        scaled(Duration::from_secs(30)),
        || {
            prom.value("sluice:attach_success:ratio_rate10m")
                .is_some_and(|v| (v - 0.75).abs() < 1e-9)
        },
    );
    eprintln!("recorded {:?} after the last attach", started.elapsed());
    let failing = prom.value(
        r#"sluice:attach_errors:rate10m{code="7",reason="invalid_argument"} / on (instance) sluice:attaches:rate10m"#,
    );
    assert!(
        failing.is_some_and(|v| (v - 0.25).abs() < 1e-9),
        "{failing:?}"
    );
    let other_failures = prom
        .query(r#"sluice:attach_errors:rate10m{code!="7"} > 0"#)
        .expect("query");
    assert!(other_failures.is_empty(), "{other_failures:?}");
    assert_eq!(prom.value("sluice:attached_pods:sum"), Some(6.0));
    assert_eq!(prom.value("sluice:agents_ready:sum"), Some(1.0));
    let p95 = prom.value("sluice:attach_duration_seconds:p95_10m");
    assert!(p95.is_some_and(|v| v > 0.0 && v < 3.5), "{p95:?}");
    // The SLO alert is pending (for: 5m) with the failing code and reason.
    wait_for(
        "the SLO alert pending",
        scaled(Duration::from_secs(30)),
        || {
            prom.query(r#"ALERTS{alertname="SluiceAttachSuccessRatioLow",alertstate="pending",code="7",reason="invalid_argument"}"#)
            .is_ok_and(|r| r.len() == 1)
        },
    );

    // Every dashboard query answers, with data (the traffic feeds them all).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("sluice-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            let result = prom.query(&expr).unwrap_or_else(|e| {
                panic!("panel {:?}: {expr}: {e}\n{}", panel["title"], prom.log())
            });
            assert!(
                !result.is_empty(),
                "panel {:?}: {expr} returned no series",
                panel["title"]
            );
            exprs += 1;
        }
    }
    assert_eq!(exprs, 12);
    let instances = get(
        prom.port,
        &format!(
            "/api/v1/label/instance/values?match[]={}",
            encode("sluice_build_info")
        ),
    )
    .expect("label values");
    assert!(
        instances.contains(&target),
        "the node variable lists the agent: {instances}"
    );
    drop(namespaces);
}
