//! The purchases each event has accepted, as every replica learns them
//! from the intents topic: what lets an ingress refuse the flood that
//! follows a sell-out from memory, asking no store, without ever telling a
//! buyer "sold out" for a purchase that was accepted.
//!
//! One consumer per ingress follows the intents topic from the ends the
//! broker gave when it started, and keeps the ids of the intents of each
//! event since. An intent's id is derived from the event, the buyer and
//! their Idempotency-Key ([`crate::intents::intent_id`]), so a purchase is
//! looked up before anything is read. A purchase for a sold-out event is
//! refused unread only when all of these hold:
//! - **the tail covers the event**: its sale could not have opened before
//!   the tail started (the events whose sale could, read from MySQL once
//!   the tail's start was fixed, are never answered unread by this
//!   process), and the event's sale closed less than an hour ago;
//! - **its id is not there**: a retry of an accepted purchase reads its
//!   key's record (one read) and gets its 202;
//! - **the event has been quiet long enough**: since this replica first
//!   refused a purchase of it as sold out (seeing stock again ends that),
//!   and since the last intent of the event its tail read, a whole
//!   hold-off has passed: the request timeout plus the quarter second a
//!   replica trusts its last read of the stock. Another replica's door let
//!   a purchase through at most a quarter second after this one first saw
//!   the sell-out, and answered it within the request timeout: a copy of
//!   it still being answered is thereby answered from its record ("in
//!   progress", then its 202), as before;
//! - **the tail is live and caught up with that moment**: it has read
//!   every message the broker held when the hold-off ended (it asks the
//!   broker for the topic's ends four times a second), and it was caught
//!   up within the last few seconds.
//!
//! Until then the refusal reads the key's record first, as every refusal
//! did before. A refusal after a sell-out is no key's final answer (it is
//! not recorded, and the key may be accepted once units come back), here
//! as before. What this leaves, all needing a retry that reaches this
//! replica before its tail has read the intent (tens of milliseconds):
//! - a replica that missed stock coming back and being taken again (both
//!   within the quarter second it trusts its last read) refuses unread a
//!   retry of a purchase another replica accepted in that moment;
//! - so does one whose tail is behind a replica that sells while it cannot
//!   read the stock (Redis failing for its reads only);
//! - a purchase cut off by the request timeout was never accepted (its
//!   buyer was told 503), but its record may still reach the broker up to
//!   `DROPLINE_KAFKA_MESSAGE_TIMEOUT_MS` later, and is then decided like
//!   any other. A retry before that is refused, one after it reads its
//!   record (which stays "in progress").
//!
//! The tail starts over (and every event then on sale is read first for
//! the rest of the process) when the broker's log is found shorter than
//! what it read, or the topic's partitions change.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dropline::config::KafkaArgs;
use dropline::kafka::TailStart;
use dropline::messages::PurchaseIntent;
use rdkafka::consumer::StreamConsumer;
use rdkafka::Message;
use sqlx::MySqlPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

use crate::snapshot::Catalog;

/// How often the broker is asked for the topic's ends.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// The tail must have been caught up this recently to be believed.
const LIVE_WITHIN: Duration = Duration::from_secs(3);
/// Ends asked for and not reached, at most (the oldest are dropped).
const ASKED_AT_MOST: usize = 64;
/// How long after its sale closed an event's intents are kept.
const KEEP_AFTER_CLOSE: chrono::Duration = chrono::Duration::hours(1);
/// How far apart replicas' clocks may be: an event whose sale opens this
/// soon after the tail starts may have been sold before it.
const CLOCK_SKEW: chrono::Duration = chrono::Duration::seconds(1);

/// A tail started, not yet read.
struct Started {
    consumer: StreamConsumer,
    starts: Vec<TailStart>,
}

/// What this replica knows of the purchases accepted, per event.
pub struct Accepted {
    state: Mutex<State>,
    /// Whether any event is sold out: spares the lock otherwise.
    any_sold_out: AtomicBool,
    /// How long an event must be quiet before its refusals go unread.
    hold_off: Duration,
}

#[derive(Default)]
struct State {
    /// `None` until the tail has started and its coverage is known.
    tail: Option<Coverage>,
    events: HashMap<u64, Intents>,
    /// Since when each event has been sold out, as this replica saw it.
    sold_out_since: HashMap<u64, Instant>,
}

struct Coverage {
    /// Events whose intents may predate the tail (or were dropped).
    uncovered: HashSet<u64>,
    /// When the broker was last asked for the ends the tail has since
    /// read up to.
    caught_up: Instant,
}

#[derive(Default)]
struct Intents {
    ids: HashSet<Uuid>,
    last: Option<Instant>,
}

impl Accepted {
    pub fn new(hold_off: Duration) -> Self {
        Self { state: Mutex::default(), any_sold_out: AtomicBool::new(false), hold_off }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a purchase of intent `id` for `event`, which the door sees
    /// sold out, can be refused without reading anything (see the module's
    /// notes). The first call of a sell-out starts its hold-off.
    pub fn refusable(&self, event: &crate::events::Event, id: Uuid) -> bool {
        let closes = event.terms.sale_closes_at + KEEP_AFTER_CLOSE;
        self.any_sold_out.store(true, Ordering::Relaxed);
        self.state().refusable(event.id, id, closes > chrono::Utc::now(), Instant::now(), self.hold_off)
    }

    /// The door sees `event_id` with stock: its next sell-out starts anew.
    pub fn reopened(&self, event_id: u64) {
        if self.any_sold_out.load(Ordering::Relaxed) {
            let mut state = self.state();
            state.sold_out_since.remove(&event_id);
            self.any_sold_out.store(!state.sold_out_since.is_empty(), Ordering::Relaxed);
        }
    }

    /// Starts following `topic`, until shutdown: the tail's start and what
    /// it covers are fixed before this returns (the ingress is ready only
    /// then), unless the broker or MySQL cannot be read, in which case it
    /// is tried again every second in the background, as it is whenever
    /// the tail has to start over (with nothing known).
    pub async fn follow(
        self: Arc<Self>,
        kafka: KafkaArgs,
        topic: String,
        db: MySqlPool,
        catalog: Arc<Catalog>,
        shutdown: CancellationToken,
    ) {
        let mut opened = self.open(&kafka, &topic, &db).await;
        tokio::spawn(async move {
            loop {
                let followed = match opened {
                    Ok(started) => self.read(started, &topic, &catalog, &shutdown).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = followed {
                    tracing::warn!(error = %e, "cannot follow the accepted intents; sold-out refusals read first");
                }
                *self.state() = State::default();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                opened = self.open(&kafka, &topic, &db).await;
            }
        });
    }

    /// Starts the tail at the topic's ends and fixes what it covers.
    async fn open(&self, kafka: &KafkaArgs, topic: &str, db: &MySqlPool) -> Result<Started, FollowError> {
        let topics = [topic.to_owned()];
        let wait = Duration::from_secs(5);
        // Everything the broker acknowledged before this is before the
        // ends the tail starts from.
        let started = Instant::now();
        let (consumer, starts) = dropline::kafka::tail_from_ends(kafka, "ingress-accepted", &topics, wait).await?;
        if starts.is_empty() {
            return Err(FollowError::NoPartitions(topic.to_owned()));
        }
        // Every event whose sale may have opened before the tail's start.
        let opened_by = chrono::Utc::now() + CLOCK_SKEW;
        let closed_after = chrono::Utc::now() - KEEP_AFTER_CLOSE;
        let uncovered = crate::record::events_on_sale_since(db, opened_by, closed_after).await?;
        self.state().tail = Some(Coverage { uncovered: uncovered.into_iter().collect(), caught_up: started });
        tracing::info!(partitions = starts.len(), "following the accepted intents");
        Ok(Started { consumer, starts })
    }

    /// Reads the tail until shutdown, or until it has to start over.
    async fn read(
        &self,
        Started { consumer, starts }: Started,
        topic: &str,
        catalog: &Catalog,
        shutdown: &CancellationToken,
    ) -> Result<(), FollowError> {
        let topics = [topic.to_owned()];
        let consumer = Arc::new(consumer);
        let (ends_tx, mut ends_rx) = mpsc::channel(2);
        let asking = tokio::spawn(ask_for_ends(consumer.clone(), topics.to_vec(), ends_tx));
        let _stop_asking = AbortOnDropHandle::new(asking);
        let mut reader = Reader::new(&starts);
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        let mut stock = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                received = consumer.recv() => {
                    // The client retries by itself; meanwhile the tail
                    // falls behind, and refusals read first.
                    let m = match received {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::debug!(error = %e, "accepted intents: kafka error");
                            continue;
                        }
                    };
                    reader.read(m.partition(), m.offset());
                    // Only the ingress writes this topic; what the
                    // allocators cannot read, they dead-letter.
                    if let Some(intent) = m.payload().and_then(|p| serde_json::from_slice::<PurchaseIntent>(p).ok()) {
                        self.state().seen(intent.event_id, intent.intent_id, Instant::now());
                    }
                }
                ends = ends_rx.recv() => match ends {
                    Some(ends) => reader.ask(ends)?,
                    None => return Err(FollowError::Ends),
                },
                _ = stock.tick() => self.state().restock(catalog),
                _ = prune.tick() => self.state().prune(catalog),
            }
            if let Some(caught_up) = reader.caught_up() {
                if let Some(tail) = self.state().tail.as_mut() {
                    tail.caught_up = tail.caught_up.max(caught_up);
                }
            }
        }
    }
}

impl State {
    fn refusable(&mut self, event_id: u64, id: Uuid, kept: bool, now: Instant, hold_off: Duration) -> bool {
        let since = *self.sold_out_since.entry(event_id).or_insert(now);
        let Some(tail) = &self.tail else { return false };
        if !kept || tail.uncovered.contains(&event_id) || now.duration_since(tail.caught_up) > LIVE_WITHIN {
            return false;
        }
        let intents = self.events.get(&event_id);
        if intents.is_some_and(|i| i.ids.contains(&id)) {
            return false;
        }
        let quiet_since = intents.and_then(|i| i.last).map_or(since, |last| last.max(since));
        tail.caught_up >= quiet_since + hold_off
    }

    fn seen(&mut self, event_id: u64, id: Uuid, now: Instant) {
        if self.tail.as_ref().is_some_and(|t| t.uncovered.contains(&event_id)) {
            return;
        }
        let intents = self.events.entry(event_id).or_default();
        intents.ids.insert(id);
        intents.last = Some(now);
    }

    /// Ends the sell-outs of events the snapshot (refreshed every second)
    /// shows with stock, though no purchase came here to see it.
    fn restock(&mut self, catalog: &Catalog) {
        let restocked = |id: &u64| catalog.get(*id).is_some_and(|(_, l)| l.is_some_and(|l| l.available > 0));
        self.sold_out_since.retain(|id, _| !restocked(id));
    }

    /// Forgets the events whose sale closed over an hour ago: their
    /// refusals read first from then on.
    fn prune(&mut self, catalog: &Catalog) {
        let now = chrono::Utc::now();
        let over = |id: &u64| catalog.get(*id).is_some_and(|(e, _)| e.terms.sale_closes_at + KEEP_AFTER_CLOSE <= now);
        self.events.retain(|id, _| !over(id));
        self.sold_out_since.retain(|id, _| !over(id));
        if let Some(tail) = self.tail.as_mut() {
            tail.uncovered.retain(|id| !over(id));
        }
    }
}

/// Where the tail stands against the ends the broker gave.
struct Reader {
    /// The next offset to read, per partition.
    next: HashMap<i32, i64>,
    /// The last end the broker gave, per partition.
    ends: HashMap<i32, i64>,
    /// Ends asked for and not yet reached, oldest first.
    asked: VecDeque<(Instant, Vec<TailStart>)>,
}

impl Reader {
    fn new(starts: &[TailStart]) -> Self {
        let next: HashMap<i32, i64> = starts.iter().map(|s| (s.partition, s.offset)).collect();
        Self { ends: next.clone(), next, asked: VecDeque::new() }
    }

    fn read(&mut self, partition: i32, offset: i64) {
        let next = self.next.entry(partition).or_default();
        *next = (*next).max(offset + 1);
    }

    /// Notes the ends the broker gave (asked for one after the other); an
    /// error if a log went back (a broker that came back without what it
    /// held), or a partition is not followed.
    fn ask(&mut self, ends: (Instant, Vec<TailStart>)) -> Result<(), FollowError> {
        for end in &ends.1 {
            match self.ends.get_mut(&end.partition) {
                None => return Err(FollowError::Partitions),
                Some(last) if *last > end.offset => return Err(FollowError::Shortened(end.partition)),
                Some(last) => *last = end.offset,
            }
        }
        if self.asked.len() == ASKED_AT_MOST {
            self.asked.pop_front();
        }
        self.asked.push_back(ends);
        Ok(())
    }

    /// When the broker was asked for the latest ends the tail has now
    /// reached (every partition read up to them), if it reached any.
    fn caught_up(&mut self) -> Option<Instant> {
        let mut reached = None;
        while let Some((at, ends)) = self.asked.front() {
            if !ends.iter().all(|e| self.next.get(&e.partition).is_some_and(|next| *next >= e.offset)) {
                break;
            }
            reached = Some(*at);
            self.asked.pop_front();
        }
        reached
    }
}

/// Asks the broker for the topic's ends every [`CHECK_EVERY`], noting when
/// each question was sent.
async fn ask_for_ends(
    consumer: Arc<StreamConsumer>,
    topics: Vec<String>,
    ends: mpsc::Sender<(Instant, Vec<TailStart>)>,
) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (consumer, topics) = (consumer.clone(), topics.clone());
        let asked_at = Instant::now();
        let answer =
            tokio::task::spawn_blocking(move || dropline::kafka::ends(&*consumer, &topics, Duration::from_secs(2)))
                .await;
        match answer {
            Ok(Ok(found)) => {
                if ends.send((asked_at, found)).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "intents topic's ends not read"),
            Err(_) => return,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error("topic {0} has no partitions")]
    NoPartitions(String),
    #[error("the topic's ends are no longer asked for")]
    Ends,
    #[error("the topic's partitions changed")]
    Partitions,
    #[error("partition {0}'s log went back")]
    Shortened(i32),
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD_OFF: Duration = Duration::from_secs(2);

    fn following(at: Instant) -> State {
        State { tail: Some(Coverage { uncovered: HashSet::from([9]), caught_up: at }), ..State::default() }
    }

    fn catch_up(state: &mut State, at: Instant) {
        state.tail.as_mut().unwrap().caught_up = at;
    }

    #[test]
    fn a_sell_out_is_refused_unread_only_once_the_tail_passed_its_hold_off() {
        let t0 = Instant::now();
        let (id, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut state = following(t0);
        state.seen(7, id, t0);
        let at = |secs: u64| t0 + Duration::from_millis(secs * 100);
        // Sold out from t0 + 0.1 s: read first, until the tail has caught
        // up with the end of the hold-off.
        assert!(!state.refusable(7, other, true, at(1), HOLD_OFF));
        catch_up(&mut state, at(20));
        assert!(!state.refusable(7, other, true, at(20), HOLD_OFF), "the tail is not past the hold-off");
        catch_up(&mut state, at(21));
        assert!(state.refusable(7, other, true, at(21), HOLD_OFF));
        // An accepted purchase's retry reads its record.
        assert!(!state.refusable(7, id, true, at(21), HOLD_OFF));
        // A tail that stopped catching up is not believed.
        let stale = at(21) + LIVE_WITHIN + Duration::from_millis(1);
        assert!(!state.refusable(7, other, true, stale, HOLD_OFF));
        catch_up(&mut state, stale);
        assert!(state.refusable(7, other, true, stale, HOLD_OFF));
        // Neither is an event it may have missed intents of, nor one long
        // closed.
        assert!(!state.refusable(9, other, true, stale, HOLD_OFF));
        assert!(!state.refusable(7, other, false, stale, HOLD_OFF));
    }

    #[test]
    fn a_new_intent_or_a_reopening_starts_the_hold_off_again() {
        let t0 = Instant::now();
        let other = Uuid::from_u128(2);
        let mut state = following(t0);
        assert!(!state.refusable(7, other, true, t0, HOLD_OFF));
        catch_up(&mut state, t0 + HOLD_OFF);
        assert!(state.refusable(7, other, true, t0 + HOLD_OFF, HOLD_OFF));
        // Another replica accepted one (it had not seen the sell-out).
        state.seen(7, Uuid::from_u128(3), t0 + HOLD_OFF);
        assert!(!state.refusable(7, other, true, t0 + HOLD_OFF, HOLD_OFF));
        catch_up(&mut state, t0 + HOLD_OFF * 2);
        assert!(state.refusable(7, other, true, t0 + HOLD_OFF * 2, HOLD_OFF));
        // Stock came back: the next sell-out is new.
        state.sold_out_since.remove(&7);
        assert!(!state.refusable(7, other, true, t0 + HOLD_OFF * 2 + Duration::from_millis(1), HOLD_OFF));
    }

    #[test]
    fn nothing_is_refused_unread_before_the_tail_started() {
        let mut state = State::default();
        assert!(!state.refusable(7, Uuid::from_u128(2), true, Instant::now() + HOLD_OFF * 10, HOLD_OFF));
    }

    #[test]
    fn the_tail_is_caught_up_once_every_partition_reached_the_ends_asked_for() {
        let start = |partition, offset| TailStart { topic: "t".into(), partition, offset };
        let mut reader = Reader::new(&[start(0, 5), start(1, 0)]);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(250);
        reader.ask((t0, vec![start(0, 5), start(1, 0)])).unwrap();
        reader.ask((t1, vec![start(0, 7), start(1, 1)])).unwrap();
        assert_eq!(reader.caught_up(), Some(t0));
        reader.read(0, 6);
        assert_eq!(reader.caught_up(), None, "partition 1 is behind");
        reader.read(1, 0);
        assert_eq!(reader.caught_up(), Some(t1));
        // Ends asked before the tail read on are no loss; a broker that
        // came back without its log, or a new partition, is.
        reader.read(0, 9);
        reader.ask((t1, vec![start(0, 8), start(1, 1)])).unwrap();
        assert!(matches!(reader.ask((t1, vec![start(0, 6), start(1, 1)])), Err(FollowError::Shortened(0))));
        assert!(matches!(reader.ask((t1, vec![start(2, 0)])), Err(FollowError::Partitions)));
    }
}
