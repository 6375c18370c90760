//! An ingress in the test process, on the real local Redis, MariaDB and
//! broker, with a deployment (database, prefixes, secrets) of its own. No
//! other stage runs: the intents it produces stay on Kafka, undecided.

#![allow(dead_code)]

use std::ops::Deref;
use std::time::Duration;

use clap::Parser;
use dropline_testkit::Deployment;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Ingress {
    deployment: Deployment,
    /// `http://<address>`
    pub api: String,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Ingress {
    /// Starts one on a free port; a flag in `args` replaces the default of
    /// the same name (see [`Deployment::ingress_args`]).
    pub async fn start(args: &[String]) -> Ingress {
        let deployment = Deployment::create().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let config = dropline_ingress::IngressConfig::parse_from(deployment.ingress_args(args));
        let shutdown = CancellationToken::new();
        let running = dropline_ingress::start_on(listener, config, shutdown.clone()).await.unwrap();
        Ingress { deployment, api, shutdown, task: running.task }
    }

    /// Creates an event through the admin API; its id.
    pub async fn create_event(&self, body: &Value) -> u64 {
        dropline_testkit::create_event(&dropline_testkit::http(), &self.api, &self.admin_token(), body).await
    }

    /// `user`'s purchase of one ticket of `event` under Idempotency-Key
    /// `key`, to send.
    pub fn purchase(&self, http: &reqwest::Client, event: u64, user: &str, key: &str) -> reqwest::RequestBuilder {
        http.post(format!("{}/v1/events/{event}/purchases", self.api))
            .bearer_auth(self.token(user))
            .header("idempotency-key", key)
            .json(&serde_json::json!({"quantity": 1}))
    }

    /// Drains the ingress as SIGTERM would, then drops its database.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.expect("the ingress drains in time").unwrap();
        self.deployment.drop_database().await;
    }
}

impl Deref for Ingress {
    type Target = Deployment;

    fn deref(&self) -> &Deployment {
        &self.deployment
    }
}
