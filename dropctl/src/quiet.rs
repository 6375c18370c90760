//! When to check: after the pipeline went quiet.
//!
//! Quiet is defined by the pipeline's progress, never by the invariants: a
//! wait for "no intent undecided" or "no hold left" would make the rows that
//! check exactly that pass by construction. Instead [`wait_quiet`] waits
//! until
//! - every consumer group has committed up to the end of what it consumes
//!   (allocator, then expirer, then settler, so the settler's ends include
//!   what the others produced), when it can reach the broker: then whatever
//!   was on Kafka is in the record, and the expirer (whose offset never
//!   passes a hold still waiting) has handled every hold it was told of;
//! - then the settlers' refund worker has no refund of the event left to
//!   try (it retries a failed call until the provider makes the refund or
//!   refuses it for good; a refusal fails "each refund made once");
//! - then the outbox relay has published every change of the event, and
//!   the notifier group has committed up to the end of the changes (its
//!   offset never passes a change whose webhook is not settled);
//! - optionally, every deadline of the event's orders has passed;
//! - and no hold is held in the window between its deadline and deadline +
//!   grace, where it could still be ended in time. A hold past that window
//!   stops no wait: it fails "holds end by their deadline".
//!
//! An intent that never reached the allocator, or a hold no expirer will
//! release, leaves the pipeline quiet and the books wrong, and the check
//! then says so.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use dropline::config::KafkaArgs;
use dropline::kafka::GroupOffsets;
use sqlx::MySqlPool;

use crate::record;

/// The deployment's Kafka side: where to read the consumer groups' progress.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The allocators' consumer group (on the intents).
    #[arg(long, env = "DROPLINE_ALLOCATOR_GROUP", default_value = "dropline-allocator")]
    pub allocator_group: String,
    /// The settlers' consumer group (on the decisions and order changes).
    #[arg(long, env = "DROPLINE_SETTLER_GROUP", default_value = "dropline-settler")]
    pub settler_group: String,
    /// The expirers' consumer group (on the hold deadlines).
    #[arg(long, env = "DROPLINE_EXPIRER_GROUP", default_value = "dropline-expirer")]
    pub expirer_group: String,
    /// The notifiers' consumer group (on the record's changes).
    #[arg(long, env = "DROPLINE_NOTIFIER_GROUP", default_value = "dropline-notifier")]
    pub notifier_group: String,
}

/// What [`wait_quiet`] waits for.
#[derive(Debug, Clone)]
pub struct Quiet {
    /// Watch the consumer groups' progress; without it only the time
    /// conditions are waited for.
    pub pipeline: Option<PipelineArgs>,
    /// Also wait until every deadline of the event's orders has passed.
    pub past_deadlines: bool,
    /// The grace of "holds end by their deadline".
    pub grace: Duration,
    pub timeout: Duration,
}

/// The groups, in the order their output flows, each with the topics it
/// consumes; the notifier's comes after the outbox relay, which is waited
/// for in between.
struct PipelineProbe {
    groups: Vec<(&'static str, GroupOffsets, Vec<String>)>,
    notifier: (GroupOffsets, Vec<String>),
}

impl PipelineProbe {
    fn new(p: &PipelineArgs) -> anyhow::Result<Self> {
        let t = p.kafka.topics();
        let wait = Duration::from_secs(5);
        let group = |name: &str| GroupOffsets::new(&p.kafka, name, wait);
        Ok(Self {
            groups: vec![
                ("allocator", group(&p.allocator_group)?, vec![t.intents.clone()]),
                ("expirer", group(&p.expirer_group)?, vec![t.hold_expiry.clone()]),
                ("settler", group(&p.settler_group)?, vec![t.decisions.clone(), t.order_changes.clone()]),
            ],
            notifier: (group(&p.notifier_group)?, vec![t.changes.clone()]),
        })
    }

    /// The first group still behind, if any.
    async fn behind(&self) -> anyhow::Result<Option<(&'static str, i64)>> {
        for (stage, group, topics) in &self.groups {
            let lag: i64 = group.read(topics).await?.iter().map(|p| p.lag()).sum();
            if lag > 0 {
                return Ok(Some((stage, lag)));
            }
        }
        Ok(None)
    }

    async fn notifier_behind(&self) -> anyhow::Result<i64> {
        let (group, topics) = &self.notifier;
        Ok(group.read(topics).await?.iter().map(|p| p.lag()).sum())
    }
}

/// Waits until the pipeline is quiet (see the module's comment) or
/// `timeout`. Returns whether it went quiet.
pub async fn wait_quiet(db: &MySqlPool, event_id: u64, quiet: &Quiet) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + quiet.timeout;
    let probe = quiet.pipeline.as_ref().map(PipelineProbe::new).transpose()?.map(Arc::new);
    let mut last_reason = String::new();
    loop {
        let reason = match not_quiet(db, event_id, quiet, probe.clone()).await {
            Ok(None) => return Ok(true),
            Ok(Some(reason)) => reason,
            // MySQL down for a moment (a restart), or the broker, is one
            // more way of not being quiet yet: keep polling until the deadline.
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(event_id, reason, "the pipeline did not go quiet in time");
            return Ok(false);
        }
        if reason != last_reason {
            tracing::debug!(event_id, reason, "waiting for the pipeline to go quiet");
            last_reason = reason;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Why the pipeline is not quiet yet, or `None` when it is.
async fn not_quiet(
    db: &MySqlPool,
    event_id: u64,
    quiet: &Quiet,
    probe: Option<Arc<PipelineProbe>>,
) -> anyhow::Result<Option<String>> {
    let now = chrono::Utc::now();
    if quiet.past_deadlines {
        let last = record::last_deadline(db, event_id).await?;
        if last.is_some_and(|last| last >= now) {
            return Ok(Some("a deadline is still ahead".into()));
        }
    }
    let in_grace = record::held_between(db, event_id, now - quiet.grace, now).await?;
    if in_grace > 0 {
        return Ok(Some(format!("{in_grace} holds past their deadline, within the grace")));
    }
    if let Some(probe) = probe {
        if let Some((stage, lag)) = probe.behind().await? {
            return Ok(Some(format!("the {stage} group is {lag} messages behind")));
        }
        let refunds = record::count(db, record::Count::RefundsInFlight, event_id).await?;
        if refunds > 0 {
            return Ok(Some(format!("{refunds} refunds not confirmed by the provider yet")));
        }
        let unpublished = record::unpublished_changes(db, event_id).await?;
        if unpublished > 0 {
            return Ok(Some(format!("{unpublished} changes not published by the outbox relay yet")));
        }
        let lag = probe.notifier_behind().await?;
        if lag > 0 {
            return Ok(Some(format!("the notifier group is {lag} messages behind")));
        }
    }
    Ok(None)
}
