//! The waiting-room page in a real headless Chromium (Debian's, driven
//! through chromedriver), on the whole pipeline: a buyer opens the link,
//! the page solves the room's proof of work and joins the pre-queue, waits
//! for the draw, is admitted, buys, and sees the hold. The test keeps a
//! screenshot of each step under `target/screenshots/`.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{process::free_port, Options, Stack};
use dropctl::api::Api;
use dropline_testkit::{eventually, http};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use reqwest::StatusCode;
use serde_json::json;

/// Chromium as the machine's notes say it runs here: headless, no
/// sandbox (root), and none of the background traffic a closed network
/// refuses.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=800,1100",
];

/// chromedriver and a browser session on it; both end when dropped.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
    _profile: Profile,
}

/// The browser's profile directory, removed when dropped.
struct Profile(PathBuf);

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    async fn start(name: &str) -> Browser {
        let port = free_port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (scripts/lib.sh's ensure_chromium installs it)");
        let profile = Profile(std::env::temp_dir().join(format!("{name}-chromium")));
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| (*a).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.0.display()));
        let capabilities = json!({ "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args } });
        let capabilities = capabilities.as_object().unwrap().clone();
        let url = format!("http://127.0.0.1:{port}");
        let client = eventually("a chromedriver session", Duration::from_secs(60), || async {
            ClientBuilder::new(HttpConnector::new()).capabilities(capabilities.clone()).connect(&url).await.ok()
        })
        .await;
        Browser { client, _driver: driver, _profile: profile }
    }

    /// Waits until the page shows `selector`.
    async fn until(&self, selector: &str, timeout: Duration) {
        let found = self.client.wait().at_most(timeout).for_element(Locator::Css(selector)).await;
        if let Err(e) = found {
            let status = self.text("#status").await;
            let detail = self.text("#detail").await;
            panic!("the page never showed {selector}: {e} (status: {status:?}, detail: {detail:?})");
        }
    }

    async fn text(&self, selector: &str) -> String {
        match self.client.find(Locator::Css(selector)).await {
            Ok(element) => element.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Saves what the page shows now; the PNG's path.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot: {} bytes", png.len());
        let dir = common::process::repo().join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_joins_waits_is_admitted_and_buys_on_the_waiting_room_page_in_chromium() {
    let stack = Stack::start(Options::default()).await;
    let api = Api::new(&stack.api).unwrap();
    let now = chrono::Utc::now();
    let body = json!({
        "name": "Night Drop Live", "venue": "Hall 7",
        "starts_at": now + chrono::Duration::days(30),
        "sale_opens_at": now + chrono::Duration::seconds(12),
        "sale_closes_at": now + chrono::Duration::hours(1),
        "capacity": 1, "price_cents": 4900, "currency": "EUR", "per_user_limit": 1, "hold_ttl_secs": 120,
    });
    let event = api.create_event(&stack.admin_token(), &body).await.unwrap()["id"].as_u64().unwrap();
    // A proof of work the page must solve in JavaScript to join.
    let room = json!({
        "prequeue_opens_at": now, "outflow_per_sec": 5, "time_to_act_secs": 120, "proof_of_work_bits": 10,
    });
    assert_eq!(stack.set_room(event, &room).await, StatusCode::CREATED);

    let browser = Browser::start(&stack.name).await;
    let token = stack.token("page-buyer");
    browser.client.goto(&format!("{}/waiting-room/{event}#token={token}", stack.api)).await.unwrap();
    // Solved the puzzle and joined: the pre-queue, as the API says too.
    browser.until("#status[data-status='pre_queue']", Duration::from_secs(60)).await;
    assert_eq!(browser.text("#event-name").await, "Night Drop Live");
    assert_eq!(api.standing(&token, event).await.unwrap().status, "pre_queue");
    assert!(!browser.client.current_url().await.unwrap().as_str().contains("token="), "the token leaves the URL");
    browser.screenshot("waiting-room-pre-queue").await;

    // The draw at the opening lets the only buyer through, live.
    browser.until("#status[data-status='admitted']", Duration::from_secs(60)).await;
    browser.until("#turn:not([hidden]) #buy", Duration::from_secs(5)).await;
    browser.screenshot("waiting-room-admitted").await;
    browser.client.find(Locator::Css("#buy")).await.unwrap().click().await.unwrap();
    browser.until("#purchase[data-status='held']", Duration::from_secs(60)).await;
    assert!(browser.text("#purchase-status").await.starts_with("Held for you until"));
    let kept = browser.screenshot("waiting-room-held").await;
    eprintln!("screenshot: {}", kept.display());

    // What the page did is what the services hold.
    let levels = stack.ledger.levels(event).await.unwrap().unwrap();
    assert_eq!((levels.available, levels.held), (0, 1));
    assert_eq!(api.standing(&token, event).await.unwrap().status, "purchased");
    browser.client.clone().close().await.unwrap();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_only_for_an_event_with_a_room_with_a_strict_policy() {
    let stack = Stack::start(Options::default()).await;
    let event = stack.open_event(5, 60).await;
    dropline_testkit::refused(
        http().get(format!("{}/waiting-room/{event}", stack.api)),
        StatusCode::NOT_FOUND,
        "no_waiting_room",
    )
    .await;
    dropline_testkit::refused(
        http().get(format!("{}/waiting-room/x", stack.api)),
        StatusCode::NOT_FOUND,
        "event_not_found",
    )
    .await;
    let script = http().get(format!("{}/assets/waiting-room.js", stack.api)).send().await.unwrap();
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8");
    assert!(script.text().await.unwrap().contains("last-event-id"));
    stack.stop().await;
}
