//! The notifier: tells the host about every change of the record, as
//! signed webhooks.
//!
//! It consumes `changes`, which the settler's outbox relay publishes: one
//! message per change of an order, written by the database in the change's
//! own transaction. Each change becomes one webhook to the host's endpoint
//! ([`deliver`]), carrying the change's id, which the receiver
//! deduplicates on, and the buyer it concerns. What became of it (delivered,
//! or dead-lettered after the last attempt) is recorded in `notifications`
//! ([`record`]), one row per change; only then is its offset finished, so a
//! change redelivered by Kafka, or published twice by the relay, is found
//! recorded and not sent again.
//!
//! It runs on the shared consumer loop as a delayed stage, like the
//! expirer: changes wait in `dropline::kafka::Schedule` until they are
//! delivered, failed attempts wait out a backoff there, and the committed
//! offset never passes a change still waiting. The consumer keeps polling
//! through a long outage of the endpoint; a partition is paused only while
//! too many of its changes wait. One order's changes are delivered in the
//! order they were made: a change waits while an earlier one of its order
//! is not delivered yet.
//!
//! A hold delivered also gets a reminder, sent shortly before its deadline
//! if it is still held then ([`reminders`]).
//!
//! Nothing here is on the purchase path: a slow or dead endpoint only makes
//! the changes wait.

pub mod config;
pub mod deliver;
pub mod metrics;
pub mod record;
pub mod reminders;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use dropline::kafka::{self, DeadLetters, PartitionKey};
use dropline::messages::{now_ms, Change, ChangeSubject, OrderState, PaymentStep};
use dropline::stage::{self, Stage, StageError};
use rdkafka::message::{Message, OwnedMessage};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use config::NotifierConfig;

use crate::deliver::{Backoff, Webhooks};
use crate::metrics::{ATTEMPTS, DELIVERY_LATENCY, NOTIFICATIONS, PENDING};
use crate::record::{Remind, Settled};

/// Changes taken from the consumer at once.
const ACCEPT_MAX: usize = 500;

/// Change ids remembered as settled by this process, besides the record:
/// a change the relay published twice is usually read twice within these.
const RECENT: usize = 100_000;

/// How long a change whose outcome could not be recorded, or whose
/// dead-letter could not be published, waits before it is tried again.
const RECORD_RETRY_MS: i64 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Webhooks(#[from] deliver::WebhooksError),
}

impl From<sqlx::migrate::MigrateError> for NotifierError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        NotifierError::Stage(e.into())
    }
}

pub async fn run(config: NotifierConfig, shutdown: CancellationToken) -> Result<(), NotifierError> {
    let stage::Consumer { ready, topics: _, publisher: _, dead_letters, consumer } =
        Stage::start_consumer(&config, &config.group_id, |t| vec![&t.changes], &shutdown).await?;
    let Some(db) = dropline::db::connect_and_migrate(&config.mysql, &shutdown).await? else {
        return Ok(());
    };
    let secret = config.notify_secret.clone().expect("validated: the secret is set");
    let webhooks = Webhooks::new(&config.notify_url, secret, config.attempt_timeout())?;
    let tick = Duration::from_millis(config.tick_ms);
    let pace = reminders::Pace {
        every: tick.max(Duration::from_millis(250)),
        concurrency: config.concurrency,
        attempt_timeout: config.attempt_timeout(),
    };
    let reminding = tokio::spawn(reminders::run(db.clone(), webhooks.clone(), pace, shutdown.clone()));
    let mut notifier = Notifier {
        db,
        webhooks,
        dead_letters: dead_letters.clone(),
        schedule: kafka::Schedule::new(config.max_pending_per_partition),
        unsent: HashMap::new(),
        recent: Recent::default(),
        backoff: config.backoff(),
        concurrency: config.concurrency,
        reminder_lead_ms: (config.reminder_lead_secs > 0).then_some(config.reminder_lead_secs as i64 * 1000),
        tick,
        shutdown: shutdown.clone(),
    };
    ready.set(true);
    tracing::info!("notifier consuming");
    let polling = kafka::Polling { stage: "notifier", max: ACCEPT_MAX, linger: Duration::ZERO };
    let ended = kafka::run_consumer(&consumer, &mut notifier, &dead_letters, &polling, &shutdown).await;
    ready.set(false);
    let _ = reminding.await;
    // Changes still waiting stay uncommitted: the next owner reads them again.
    tracing::info!(waiting = notifier.schedule.waiting(), "notifier stopped");
    ended.map_err(|e| NotifierError::Stage(e.into()))
}

/// A change on its way to the host.
#[derive(Debug, Clone)]
struct Pending {
    change: Arc<Change>,
    /// The message it came in, for the dead-letter topic.
    message: Arc<OwnedMessage>,
    /// Failed attempts so far, and the last one's problem.
    failed: u32,
    last_error: Option<String>,
    /// Delivered (true) or dead-lettered (false), not recorded yet.
    settled: Option<bool>,
}

struct Notifier {
    db: MySqlPool,
    webhooks: Webhooks,
    dead_letters: DeadLetters,
    schedule: kafka::Schedule<Pending>,
    /// Per partition and key (the order), the offsets of the changes not
    /// delivered yet: a change waits for the earlier ones of its order.
    unsent: HashMap<(PartitionKey, String), BTreeSet<i64>>,
    recent: Recent,
    backoff: Backoff,
    concurrency: usize,
    reminder_lead_ms: Option<i64>,
    tick: Duration,
    shutdown: CancellationToken,
}

impl kafka::ConsumerStage for Notifier {
    type Item = Change;

    fn decode(&self, m: &OwnedMessage) -> Result<Change, String> {
        let payload = m.payload().ok_or("empty payload")?;
        serde_json::from_slice(payload).map_err(|e| format!("undecodable change: {e}"))
    }

    async fn accept(&mut self, batch: Vec<(Option<Change>, &OwnedMessage)>) -> Option<()> {
        let ids: Vec<Uuid> = batch.iter().filter_map(|(c, _)| Some(c.as_ref()?.change_id)).collect();
        let db = &self.db;
        let settled =
            kafka::retry_until("reading notifications", &self.shutdown, || record::settled_among(db, &ids)).await?;
        let now = now_ms();
        for (change, m) in batch {
            let partition: PartitionKey = (m.topic().to_owned(), m.partition());
            let change = change.filter(|c| !settled.contains(&c.change_id) && !self.recent.contains(&c.change_id));
            let Some(change) = change else {
                self.schedule.add(partition, m.offset(), None);
                continue;
            };
            self.unsent.entry((partition.clone(), change.key())).or_default().insert(m.offset());
            let pending = Pending {
                change: Arc::new(change),
                message: Arc::new(m.clone()),
                failed: 0,
                last_error: None,
                settled: None,
            };
            self.schedule.add(partition, m.offset(), Some((now, pending)));
        }
        ::metrics::gauge!(PENDING.name).set(self.schedule.waiting() as f64);
        Some(())
    }

    fn finished(&mut self) -> Vec<(PartitionKey, i64)> {
        self.schedule.take_committable()
    }

    fn due_every(&self) -> Option<Duration> {
        Some(self.tick)
    }

    async fn work_due(&mut self) {
        self.deliver_due().await;
        ::metrics::gauge!(PENDING.name).set(self.schedule.waiting() as f64);
    }

    fn revoked(&mut self, partitions: &[PartitionKey]) {
        for p in partitions {
            self.schedule.forget(p);
        }
        self.unsent.retain(|(p, _), _| !partitions.contains(p));
    }

    fn flow(&mut self) -> (Vec<PartitionKey>, Vec<PartitionKey>) {
        self.schedule.flow_changes()
    }
}

type Due = kafka::Due<Pending>;

impl Notifier {
    async fn deliver_due(&mut self) {
        let now = now_ms();
        let mut sending: Vec<Due> = Vec::new();
        let mut settled: Vec<Due> = Vec::new();
        for d in self.schedule.due(now, self.concurrency * 4) {
            if d.item.settled.is_some() {
                settled.push(d);
            } else if self.recent.contains(&d.item.change.change_id) {
                // Published twice, and the first copy is recorded already.
                self.sent(&d);
                self.schedule.done(&d.partition, d.offset);
            } else if !self.first_of_its_order(&d) {
                let at = now + self.tick.as_millis() as i64;
                self.schedule.retry_at(&d.partition, d.offset, at, d.item);
            } else if sending.len() < self.concurrency {
                sending.push(d);
            }
        }
        let webhooks = &self.webhooks;
        let attempts = sending.iter().map(|d| {
            let id = d.item.change.change_id;
            let body = deliver::change_body(&d.item.change);
            async move { webhooks.send(id, &body).await }
        });
        let results = futures::future::join_all(attempts).await;
        for (mut d, result) in sending.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    ::metrics::counter!(ATTEMPTS.name, "result" => "ok").increment(1);
                    d.item.settled = Some(true);
                    self.sent(&d);
                    settled.push(d);
                }
                Err(e) => {
                    ::metrics::counter!(ATTEMPTS.name, "result" => "failed").increment(1);
                    d.item.failed += 1;
                    d.item.last_error = Some(e.to_string());
                    if self.backoff.retries_after(d.item.failed) {
                        let at = now_ms() + self.backoff.after(d.item.failed).as_millis() as i64;
                        tracing::debug!(change_id = %d.item.change.change_id, failed = d.item.failed, error = %e, "webhook failed; retrying");
                        self.schedule.retry_at(&d.partition, d.offset, at, d.item);
                    } else {
                        settled.extend(self.give_up(d, &e).await);
                    }
                }
            }
        }
        if !settled.is_empty() {
            self.record(settled).await;
        }
    }

    /// Whether no earlier change of the same order waits undelivered in the
    /// partition.
    fn first_of_its_order(&self, d: &Due) -> bool {
        let key = (d.partition.clone(), d.item.change.key());
        self.unsent.get(&key).and_then(|offsets| offsets.first()) == Some(&d.offset)
    }

    /// The change is out of the way of the later ones of its order.
    fn sent(&mut self, d: &Due) {
        let key = (d.partition.clone(), d.item.change.key());
        if let Some(offsets) = self.unsent.get_mut(&key) {
            offsets.remove(&d.offset);
            if offsets.is_empty() {
                self.unsent.remove(&key);
            }
        }
    }

    /// The last attempt failed: the change goes to the dead-letter topic,
    /// with the reason, and is recorded as dead-lettered. `None` if the
    /// dead-letter topic could not be written (tried again later).
    async fn give_up(&mut self, mut d: Due, e: &deliver::Failed) -> Option<Due> {
        let reason = format!("undeliverable after {} attempts: {e}", d.item.failed);
        tracing::warn!(change_id = %d.item.change.change_id, %reason, "webhook dead-lettered");
        if let Err(e) = self.dead_letters.park(&d.item.message, "undeliverable", &reason).await {
            tracing::warn!(error = %e, "dead-lettering a webhook failed; trying again");
            let at = now_ms() + RECORD_RETRY_MS;
            self.schedule.retry_at(&d.partition, d.offset, at, d.item);
            return None;
        }
        d.item.settled = Some(false);
        self.sent(&d);
        Some(d)
    }

    /// Records what became of `settled`, with the reminders of the holds
    /// delivered; then their offsets are finished. If the record cannot be
    /// written, they are recorded later, never sent again.
    async fn record(&mut self, settled: Vec<Due>) {
        let now = now_ms();
        let rows: Vec<Settled> = settled.iter().map(|d| outcome(&d.item)).collect();
        let reminders: Vec<Remind> = match self.reminder_lead_ms {
            Some(lead) => settled.iter().filter_map(|d| reminder_of(&d.item, lead, now)).collect(),
            None => Vec::new(),
        };
        if let Err(e) = record::settle(&self.db, &rows, &reminders, &[]).await {
            tracing::warn!(error = %e, count = rows.len(), "recording notifications failed; trying again");
            for d in settled {
                self.schedule.retry_at(&d.partition, d.offset, now + RECORD_RETRY_MS, d.item);
            }
            return;
        }
        for d in settled {
            let outcome = if d.item.settled == Some(true) { "delivered" } else { "dead_lettered" };
            ::metrics::counter!(NOTIFICATIONS.name, "outcome" => outcome).increment(1);
            if d.item.settled == Some(true) {
                let latency = (now - d.item.change.changed_at_ms).max(0) as f64 / 1000.0;
                ::metrics::histogram!(DELIVERY_LATENCY.name).record(latency);
            }
            self.recent.insert(d.item.change.change_id);
            self.schedule.done(&d.partition, d.offset);
        }
    }
}

/// The row recording what became of a change's webhook.
fn outcome(p: &Pending) -> Settled {
    Settled {
        id: p.change.change_id,
        kind: p.change.kind(),
        event_id: p.change.event_id,
        order_id: p.change.order_id(),
        delivered: p.settled == Some(true),
        attempts: p.failed + u32::from(p.settled == Some(true)),
        last_error: p.last_error.clone(),
    }
}

/// The reminder of a hold just delivered, if its deadline is far enough
/// ahead to remind of it; a start of payment (which extended the deadline)
/// moves the hold's reminder to the new one.
fn reminder_of(p: &Pending, lead_ms: i64, now_ms: i64) -> Option<Remind> {
    let (order_id, expires_at_ms) = match p.change.subject {
        ChangeSubject::Order { order_id, state: OrderState::Held, expires_at_ms, .. }
        | ChangeSubject::Payment { order_id, step: PaymentStep::Started, expires_at_ms, .. } => {
            (order_id, expires_at_ms)
        }
        _ => return None,
    };
    let due = expires_at_ms - lead_ms;
    (p.settled == Some(true) && due > now_ms).then(|| Remind {
        order_id,
        id: reminders::id_of(p.change.change_id),
        event_id: p.change.event_id,
        due_at: dropline::db::from_ms(due),
    })
}

/// The change ids this process settled lately, oldest forgotten first.
#[derive(Default)]
struct Recent {
    ids: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl Recent {
    fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: Uuid) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            if self.order.len() > RECENT {
                let old = self.order.pop_front().expect("not empty");
                self.ids.remove(&old);
            }
        }
    }
}
