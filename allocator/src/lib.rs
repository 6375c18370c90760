//! The allocator: turns purchase intents into decisions.
//!
//! For each batch consumed from `intents` it decodes the intents (sending
//! undecodable ones to the dead-letter topic), groups them by event, decides
//! each group with one atomic Lua call, and publishes the decisions and the
//! holds' expiry messages. Offsets are stored only once all of that is
//! acknowledged by the broker. A crash anywhere before that redelivers the
//! batch, and the script hands redelivered intents their first decision.
//!
//! - [`stock`]: gauges of the stock of recently sold events.
//! - [`config`]: settings; [`metrics`]: metric names.

pub mod config;
pub mod metrics;
pub mod stock;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dropline::kafka::{self, PublishError, Publisher, Record};
use dropline::messages::{now_ms, Decision, HoldExpiry, Outcome, PurchaseIntent, Topics};
use dropline::stage::{self, Stage, StageError};
use dropline::stock::{Ledger, LedgerError, Undecided, Verdict};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use config::AllocatorConfig;

use crate::metrics::{DECISIONS, DECISION_LATENCY, LEDGER_ERRORS, LUA_DURATION};
use crate::stock::StockWatch;

/// Largest quantity an intent may carry; the ingress enforces the event's
/// own limit, this guards against anything else on the topic.
const MAX_QUANTITY: u32 = 100;

struct Allocator {
    /// This allocator's name in the events' in-flight marks.
    instance: String,
    /// Verdicts taken and not yet acknowledged by Kafka, by intent: at most
    /// one batch's worth.
    unpublished: std::sync::Mutex<HashMap<Uuid, Verdict>>,
    ledger: Ledger,
    watch: Arc<StockWatch>,
    publisher: Publisher,
    topics: Topics,
}

pub async fn run(config: AllocatorConfig, shutdown: CancellationToken) -> Result<(), StageError> {
    let stage::Consumer { ready, topics, publisher, dead_letters, consumer } =
        Stage::start_consumer(&config, &config.group_id, |t| vec![&t.intents], &shutdown).await?;
    let ledger = Ledger::new(config.shared.redis.pool()?, &config.shared.redis.key_prefix);
    let watch = Arc::new(StockWatch::default());
    tokio::spawn(watch.clone().sample(ledger.clone(), Duration::from_secs(2), shutdown.clone()));
    let instance =
        format!("{}-{}", config.shared.kafka.instance_id("allocator-consumer").unwrap_or_default(), Uuid::new_v4());
    let allocator = Allocator { instance, unpublished: Default::default(), ledger, watch, publisher, topics };
    ready.set(true);
    tracing::info!("allocator consuming");

    let mut options = config.shared.kafka.batch_options("allocator", config.batch_max, config.batch_linger_ms);
    // Between attempts the in-flight marks are not renewed: keep the pause
    // well inside the rebuild's grace (DROPLINE_SETTLER_REBUILD_GRACE_MS).
    options.max_backoff = Duration::from_secs(2);
    let ended = kafka::run_batches(&consumer, &allocator, &dead_letters, &options, &shutdown).await;
    ready.set(false);
    tracing::info!("allocator stopped");
    ended?;
    Ok(())
}

/// Why a batch could not be decided.
#[derive(Debug, thiserror::Error)]
enum DecideError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("publishing decisions: {0}")]
    Publish(#[from] PublishError),
    #[error("event {0} is not in the record: no ledger can ever decide its intents")]
    UnknownEvent(u64),
}

impl kafka::Failure for DecideError {
    fn is_permanent(&self) -> bool {
        // Redis down, a ledger missing or fenced (only a pre-warm or a
        // rebuild can fix it), the broker down: all wait. So does an answer
        // the script should never give: it may have taken stock already,
        // and parking its intents would strand that stock. Only an intent
        // for an event the record does not have is its own fault.
        matches!(self, DecideError::UnknownEvent(_))
    }
}

/// How often an allocator renews its in-flight marks while it publishes.
const MARK_RENEW: Duration = Duration::from_secs(1);

impl kafka::BatchStage for Allocator {
    type Item = PurchaseIntent;
    type Error = DecideError;

    fn decode(&self, message: &OwnedMessage) -> Result<PurchaseIntent, String> {
        decode(message)
    }

    /// Decides every intent (one script call per event) and publishes the
    /// decisions and expiry messages, acknowledged.
    ///
    /// Each event is marked in flight (in Redis) from before its decision
    /// until Kafka acknowledged it, so a rebuild fenced meanwhile waits for
    /// it. Decisions are kept until published: a retry publishes the same
    /// ones again without asking the ledger, even if the event was fenced
    /// in between, so nothing a buyer may have seen is lost to a rebuild.
    async fn apply(&self, intents: &[(PurchaseIntent, &OwnedMessage)]) -> Result<(), DecideError> {
        let mut by_event: HashMap<u64, Vec<&(PurchaseIntent, &OwnedMessage)>> = HashMap::new();
        for item in intents {
            by_event.entry(item.0.event_id).or_default().push(item);
        }
        let mut outgoing = Vec::new();
        for (event_id, intents) in &by_event {
            self.watch.saw(*event_id);
            self.ledger.publishing(*event_id, &self.instance).await?;
            let verdicts = match self.unpublished(intents) {
                Some(verdicts) => verdicts,
                None => self.allocate(*event_id, intents).await?,
            };
            let now = now_ms();
            for ((intent, message), verdict) in intents.iter().map(|i| (&i.0, i.1)).zip(verdicts) {
                let request_id = kafka::request_id(message);
                let decision = decision(intent, verdict);
                let outcome = outcome_label(&decision.outcome);
                ::metrics::counter!(DECISIONS.name, "outcome" => outcome).increment(1);
                ::metrics::histogram!(DECISION_LATENCY.name)
                    .record((now - intent.accepted_at_ms).max(0) as f64 / 1000.0);
                tracing::debug!(request_id = request_id.as_deref(), intent_id = %intent.intent_id, outcome, "decided");
                outgoing.extend(self.messages_for(&decision, request_id.as_deref()));
            }
        }
        // The marks are renewed while the publish runs (a send may wait for
        // queue space and then for the broker), so a rebuild never takes a
        // live allocator for a dead one.
        let events: Vec<u64> = by_event.keys().copied().collect();
        let publish = self.publish(&outgoing);
        tokio::pin!(publish);
        let published = loop {
            tokio::select! {
                result = &mut publish => break result,
                _ = tokio::time::sleep(MARK_RENEW) => {
                    for event_id in &events {
                        if let Err(e) = self.ledger.publishing(*event_id, &self.instance).await {
                            tracing::warn!(error = %e, event_id, "renewing an in-flight mark failed");
                        }
                    }
                }
            }
        };
        published?;
        {
            let mut kept = self.unpublished.lock().unwrap_or_else(|p| p.into_inner());
            for (intent, _) in intents {
                kept.remove(&intent.intent_id);
            }
        }
        for event_id in &events {
            self.ledger.published(*event_id, &self.instance).await?;
        }
        Ok(())
    }
}

impl Allocator {
    /// The verdicts an earlier attempt took for these intents and could not
    /// publish, if it took them all.
    fn unpublished(&self, intents: &[&(PurchaseIntent, &OwnedMessage)]) -> Option<Vec<Verdict>> {
        let kept = self.unpublished.lock().unwrap_or_else(|p| p.into_inner());
        intents.iter().map(|(i, _)| kept.get(&i.intent_id).cloned()).collect()
    }

    /// Decides one event's intents with the ledger and keeps the verdicts
    /// until they are published.
    async fn allocate(
        &self,
        event_id: u64,
        intents: &[&(PurchaseIntent, &OwnedMessage)],
    ) -> Result<Vec<Verdict>, DecideError> {
        let undecided: Vec<Undecided<'_>> = intents
            .iter()
            .map(|(i, _)| Undecided { intent_id: i.intent_id, user_id: &i.user_id, quantity: i.quantity })
            .collect();
        let started = Instant::now();
        let result = self.ledger.allocate(event_id, &undecided).await;
        ::metrics::histogram!(LUA_DURATION.name).record(started.elapsed().as_secs_f64());
        match result {
            Ok(verdicts) => {
                let mut kept = self.unpublished.lock().unwrap_or_else(|p| p.into_inner());
                for ((intent, _), verdict) in intents.iter().zip(&verdicts) {
                    kept.insert(intent.intent_id, verdict.clone());
                }
                Ok(verdicts)
            }
            Err(e) => {
                // Nothing of this event was decided by this batch (what an
                // earlier attempt decided is kept and republished without
                // asking), so a rebuild need not wait for us.
                self.ledger.published(event_id, &self.instance).await?;
                ::metrics::counter!(LEDGER_ERRORS.name, "kind" => ledger_error_kind(&e)).increment(1);
                if matches!(e, LedgerError::NoLedger(_)) && self.ledger.is_unknown_event(event_id).await? {
                    return Err(DecideError::UnknownEvent(event_id));
                }
                if matches!(e, LedgerError::NoLedger(_) | LedgerError::Damaged(..)) {
                    // The settlers' reconciler rebuilds it from MySQL.
                    if let Err(asked) = self.ledger.request_rebuild(event_id, &e.to_string()).await {
                        tracing::warn!(error = %asked, event_id, "could not ask for a rebuild");
                    }
                }
                Err(e.into())
            }
        }
    }

    /// The decision, and for a hold its expiry message, both carrying the
    /// purchase's request id.
    fn messages_for(&self, d: &Decision, request_id: Option<&str>) -> Vec<Outgoing> {
        let key = d.event_id.to_string();
        let request_id = request_id.map(str::to_owned);
        let mut out = vec![Outgoing {
            topic: self.topics.decisions.clone(),
            key: key.clone(),
            payload: to_json(d),
            request_id: request_id.clone(),
        }];
        if let Outcome::Held { expires_at_ms, .. } = d.outcome {
            let expiry = HoldExpiry { order_id: d.intent_id, event_id: d.event_id, expires_at_ms };
            out.push(Outgoing { topic: self.topics.hold_expiry.clone(), key, payload: to_json(&expiry), request_id });
        }
        out
    }

    /// Publishes all messages at once and waits for every acknowledgement.
    /// If any failed the whole set is published again: consumers dedup by id.
    async fn publish(&self, messages: &[Outgoing]) -> Result<(), PublishError> {
        let records =
            messages.iter().map(|m| Record::new(&m.topic, &m.key, &m.payload).request_id(m.request_id.as_deref()));
        self.publisher.publish_all(records).await.into_iter().collect()
    }
}

/// A message to produce once the batch is decided.
struct Outgoing {
    topic: String,
    key: String,
    payload: Vec<u8>,
    request_id: Option<String>,
}

fn decode(message: &OwnedMessage) -> Result<PurchaseIntent, String> {
    let payload = message.payload().ok_or("empty payload")?;
    let intent: PurchaseIntent = serde_json::from_slice(payload).map_err(|e| format!("undecodable intent: {e}"))?;
    if intent.quantity == 0 || intent.quantity > MAX_QUANTITY {
        return Err(format!("quantity {} outside 1..={MAX_QUANTITY}", intent.quantity));
    }
    if !dropline::auth::is_valid_user_id(&intent.user_id) {
        return Err("invalid user id".into());
    }
    Ok(intent)
}

fn decision(intent: &PurchaseIntent, verdict: Verdict) -> Decision {
    let (decided_at_ms, outcome) = match verdict {
        Verdict::Held { expires_at_ms, amount_cents, decided_at_ms, units } => {
            (decided_at_ms, Outcome::Held { expires_at_ms, amount_cents, units })
        }
        Verdict::Rejected { reason, decided_at_ms } => (decided_at_ms, Outcome::Rejected { reason }),
    };
    Decision {
        intent_id: intent.intent_id,
        event_id: intent.event_id,
        user_id: intent.user_id.clone(),
        quantity: intent.quantity,
        decided_at_ms,
        outcome,
    }
}

fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Held { .. } => "held",
        Outcome::Rejected { reason } => reason.as_str(),
    }
}

fn ledger_error_kind(e: &LedgerError) -> &'static str {
    match e {
        LedgerError::NoLedger(_) => "no_ledger",
        LedgerError::Fenced(_) | LedgerError::FenceLost(_) => "fenced",
        LedgerError::Pool(_) | LedgerError::Redis(_) => "redis",
        LedgerError::Damaged(..) => "damaged",
        LedgerError::Corrupt(_) => "corrupt",
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("messages serialize")
}

#[cfg(test)]
mod tests {
    use dropline::messages::RejectReason;
    use rdkafka::message::Timestamp;

    use super::*;

    fn message(payload: Option<Vec<u8>>) -> OwnedMessage {
        OwnedMessage::new(payload, None, "intents".into(), Timestamp::NotAvailable, 0, 0, None)
    }

    fn intent(user_id: &str, quantity: u32) -> PurchaseIntent {
        PurchaseIntent {
            intent_id: Uuid::new_v4(),
            event_id: 7,
            user_id: user_id.to_owned(),
            quantity,
            accepted_at_ms: 1_000,
        }
    }

    /// What the ledger must never see is a poison message (dead-lettered),
    /// not a decision.
    #[test]
    fn intents_the_ledger_must_not_see_are_told_apart() {
        let good = intent("alice", 2);
        assert_eq!(decode(&message(Some(to_json(&good)))), Ok(good));
        for (payload, why) in [
            (None, "empty payload"),
            (Some(b"{\"intent_id\": 1}".to_vec()), "undecodable intent"),
            (Some(to_json(&intent("alice", 0))), "quantity 0 outside"),
            (Some(to_json(&intent("alice", MAX_QUANTITY + 1))), "quantity 101 outside"),
            (Some(to_json(&intent("", 1))), "invalid user id"),
            (Some(to_json(&intent("al ice", 1))), "invalid user id"),
        ] {
            let e = decode(&message(payload)).unwrap_err();
            assert!(e.starts_with(why), "{e}");
        }
    }

    #[test]
    fn a_decision_carries_its_intent_and_its_verdict() {
        let i = intent("bob", 2);
        let held = Verdict::Held { expires_at_ms: 9_000, amount_cents: 2_400, decided_at_ms: 5_000, units: vec![3, 4] };
        let d = decision(&i, held);
        assert_eq!((d.intent_id, d.event_id, d.user_id.as_str(), d.quantity), (i.intent_id, 7, "bob", 2));
        assert_eq!(d.decided_at_ms, 5_000);
        assert_eq!(d.outcome, Outcome::Held { expires_at_ms: 9_000, amount_cents: 2_400, units: vec![3, 4] });
        assert_eq!(outcome_label(&d.outcome), "held");
        let d = decision(&i, Verdict::Rejected { reason: RejectReason::SoldOut, decided_at_ms: 6_000 });
        assert_eq!((d.decided_at_ms, &d.outcome), (6_000, &Outcome::Rejected { reason: RejectReason::SoldOut }));
        assert_eq!(outcome_label(&d.outcome), "sold_out");
    }
}
