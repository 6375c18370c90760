//! The SRE's view, proven on a live run: the four stages run as real
//! processes, a real Prometheus scrapes them with Dropline's rules loaded, a
//! small drop runs, and then every dashboard query must return data and no
//! alert may fire. Stopping the settler must then fire DroplineStageDown.
//!
//! Needs the binaries (`cargo build --bins`, which scripts/test.sh runs
//! first) and `prometheus` on the PATH (scripts/test.sh installs it).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::process::{bin_dir, free_port, repo, spawn};
use common::{eventually, Secrets};
use dropctl::api::Api;
use dropctl::drill::{self, DropPlan};
use dropctl::prometheus::Prometheus;
use dropline::stock::Ledger;

/// The dashboard's queries, with its variables set to "all".
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("monitoring/grafana/dropline.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap().replace("$event", ".*");
            out.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

/// The rules file with every `for:` cut to one second: the test proves the
/// expressions; rules_test.yml proves the durations.
fn rules_for_test() -> String {
    std::fs::read_to_string(repo().join("monitoring/prometheus/rules.yml"))
        .unwrap()
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                format!("{}for: 1s", &l[..l.len() - l.trim_start().len()])
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_has_data_and_alerts_fire_only_on_faults() {
    dropline::telemetry::init_logs();
    let name = format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let db_url = format!("{}/dropline_{name}", common::mysql_server());
    dropline::db::create_database(&db_url).await.unwrap();
    let dir = std::env::temp_dir().join(format!("dropline-{name}"));
    std::fs::create_dir_all(&dir).unwrap();

    let (api_port, paysim_port, prom_port, receiver_port) = (free_port(), free_port(), free_port(), free_port());
    let ops: BTreeMap<&str, u16> =
        ["ingress", "allocator", "settler", "expirer", "notifier"].into_iter().map(|s| (s, free_port())).collect();
    let secrets = Secrets::generate();
    let common_env = |stage: &str| -> Vec<(&str, String)> {
        let mut env = vec![
            ("DROPLINE_LOG", "warn".into()),
            ("DROPLINE_KAFKA_BROKERS", common::brokers()),
            ("DROPLINE_TOPIC_PREFIX", name.clone()),
            ("DROPLINE_TOPIC_PARTITIONS", "3".into()),
            ("DROPLINE_REDIS_URL", common::redis_url()),
            ("DROPLINE_REDIS_KEY_PREFIX", name.clone()),
            ("DROPLINE_MYSQL_URL", db_url.clone()),
            ("DROPLINE_OPS_ADDR", format!("127.0.0.1:{}", ops[stage])),
            ("DROPLINE_ALLOCATOR_GROUP", format!("{name}-allocator")),
            ("DROPLINE_SETTLER_GROUP", format!("{name}-settler")),
            ("DROPLINE_EXPIRER_GROUP", format!("{name}-expirer")),
            ("DROPLINE_NOTIFIER_GROUP", format!("{name}-notifier")),
            ("DROPLINE_SETTLER_DRIFT_INTERVAL_SECS", "1".into()),
            ("DROPLINE_EXPIRER_TICK_MS", "50".into()),
            ("DROPLINE_NOTIFY_URL", format!("http://127.0.0.1:{receiver_port}/webhooks")),
        ];
        env.extend(secrets.env());
        env
    };
    let bin = bin_dir();
    let paysim = spawn(
        "paysim",
        bin.join("dropline-paysim"),
        &[
            ("DROPLINE_LOG", "warn".into()),
            ("DROPLINE_PAYSIM_LISTEN_ADDR", format!("127.0.0.1:{paysim_port}")),
            ("DROPLINE_PAYSIM_WEBHOOK_URL", format!("http://127.0.0.1:{api_port}/v1/webhooks/payments")),
            ("DROPLINE_WEBHOOK_SECRET", secrets.webhook.clone()),
        ],
        &[],
    );
    let mut ingress_env = common_env("ingress");
    ingress_env.push(("DROPLINE_LISTEN_ADDR", format!("127.0.0.1:{api_port}")));
    // Every buyer of the test's drop comes from 127.0.0.1.
    ingress_env.push(("DROPLINE_IP_PER_SEC", "1000000".into()));
    ingress_env.push(("DROPLINE_IP_BURST", "1000000".into()));
    ingress_env.push(("DROPLINE_PAYMENT_PROVIDER_URL", format!("http://127.0.0.1:{paysim_port}")));
    // The drop's holds last 2 s: starting to pay adds 2 s, not the 120 s
    // meant for holds of minutes (the drill waits for every deadline, and
    // a gauge nobody sets for 60 s leaves the scrape).
    ingress_env.push(("DROPLINE_PAYMENT_HOLD_EXTENSION_SECS", "2".into()));
    let ingress = spawn("ingress", bin.join("dropline-ingress"), &ingress_env, &[]);
    let allocator = spawn("allocator", bin.join("dropline-allocator"), &common_env("allocator"), &[]);
    let mut settler_env = common_env("settler");
    settler_env.push(("DROPLINE_PAYMENT_PROVIDER_URL", format!("http://127.0.0.1:{paysim_port}")));
    let settler = spawn("settler", bin.join("dropline-settler"), &settler_env, &[]);
    let expirer = spawn("expirer", bin.join("dropline-expirer"), &common_env("expirer"), &[]);
    let notifier = spawn("notifier", bin.join("dropline-notifier"), &common_env("notifier"), &[]);
    // The host's end, as the local stack runs it.
    let _receiver = spawn(
        "receiver",
        bin.join("dropctl"),
        &[
            ("DROPLINE_RECEIVER_ADDR", format!("127.0.0.1:{receiver_port}")),
            ("DROPLINE_NOTIFY_SECRET", secrets.notify.clone()),
        ],
        &["receive".into()],
    );

    std::fs::write(dir.join("rules.yml"), rules_for_test()).unwrap();
    let scrape: String = ops
        .iter()
        .map(|(stage, port)| {
            format!("  - job_name: dropline-{stage}\n    static_configs: [{{ targets: [\"127.0.0.1:{port}\"] }}]\n")
        })
        .collect();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\nscrape_configs:\n{scrape}"),
    )
    .unwrap();
    let _prometheus = spawn(
        "prometheus",
        PathBuf::from("prometheus"),
        &[],
        &[
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
            "--log.level=warn".into(),
        ],
    );
    let prom = Prometheus::new(&format!("http://127.0.0.1:{prom_port}")).unwrap();
    let now = || chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    eventually("every stage scraped and up", Duration::from_secs(60), || async {
        let up = prom.instant("sum(up{job=~\"dropline-.*\"})", now()).await.ok()?;
        (up.first()?.samples.first()?.1 == 5.0).then_some(())
    })
    .await;

    // A small, healthy drop.
    let keys = secrets.tokens();
    let db = dropline::db::connect(&dropline::config::MysqlArgs::new(db_url.clone(), 3)).await.unwrap();
    let pool = common::redis(16).pool().unwrap();
    let ledger = Ledger::new(pool, &name);
    let api = Api::new(&format!("http://127.0.0.1:{api_port}")).unwrap();
    let plan = DropPlan {
        tickets: 20,
        oversell_allowance: 0,
        buyers: 60,
        concurrency: 30,
        hold_ttl_secs: 2,
        per_user_limit: 2,
        pay_share: 0.5,
        cancel_share: 0.25,
        late_pay_share: 0.0,
        payment_trouble_share: 0.0,
        paid_cancel_share: 0.0,
        webhook_copies: 1,
        user_prefix: "watched-".into(),
        grace: dropctl::invariants::production_grace(),
        pipeline: Some(common::pipeline(&common::brokers(), &name)),
        provider: Some(format!("http://127.0.0.1:{paysim_port}")),
        room: None,
    };
    let report = drill::run(&api, &keys, &db, &ledger, &plan).await.unwrap();
    assert!(report.passed() && report.sold_out_exactly(), "{report:#?}");

    // Prometheus has seen the whole drop once the admitted counter it
    // scraped matches what the buyers were told, and the drift gauge of
    // this event exists.
    let accepted = report.accepted as f64;
    let event = report.event_id;
    eventually("prometheus to catch up", Duration::from_secs(60), || async {
        let admitted = prom.instant("sum(dropline_ingress_purchases_total{outcome=\"admitted\"})", now()).await.ok()?;
        let drift =
            prom.instant(&format!("dropline_settler_ledger_drift_units{{event_id=\"{event}\"}}"), now()).await.ok()?;
        (admitted.first()?.samples.first()?.1 == accepted && !drift.is_empty()).then_some(())
    })
    .await;

    // Every panel has data once every stage reported at least once (Kafka
    // statistics come every 5 s).
    let queries = dashboard_queries();
    let mut empty = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        empty.clear();
        for (title, expr) in &queries {
            let answer = prom.instant(expr, now()).await.unwrap_or_else(|e| panic!("{title}: {expr}: {e}"));
            if answer.is_empty() {
                empty.push(format!("{title}: {expr}"));
            }
        }
        if empty.is_empty() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(empty.is_empty(), "dashboard queries without data:\n{}", empty.join("\n"));

    let rules: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{prom_port}/api/v1/rules?type=alert"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let alerts: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| (r["name"].as_str().unwrap().to_owned(), r["query"].as_str().unwrap().to_owned()))
        .collect();
    assert!(alerts.len() >= 8, "the alert rules loaded: {alerts:?}");
    for (alert, expr) in &alerts {
        let firing = prom.instant(expr, now()).await.unwrap();
        assert!(firing.is_empty(), "{alert} would fire on a healthy run: {firing:?}");
    }

    // The fault: the settler goes away.
    settler.terminate().await;
    eventually("DroplineStageDown to fire for the settler", Duration::from_secs(60), || async {
        let answer: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{prom_port}/api/v1/alerts")).await.ok()?.json().await.ok()?;
        answer["data"]["alerts"]
            .as_array()?
            .iter()
            .any(|a| {
                a["labels"]["alertname"] == "DroplineStageDown"
                    && a["labels"]["job"] == "dropline-settler"
                    && a["state"] == "firing"
            })
            .then_some(())
    })
    .await;

    for p in [ingress, allocator, expirer, notifier, paysim] {
        p.terminate().await;
    }
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS dropline_{name}")).execute(&db).await;
    let _ = std::fs::remove_dir_all(&dir);
}
