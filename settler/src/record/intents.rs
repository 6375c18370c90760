//! `intents`: every decided intent's one outcome.

use chrono::{DateTime, Utc};
use dropline::db::from_ms;
use dropline::messages::{Decision, Outcome, OutcomeKind, RejectReason};
use sqlx::{MySql, MySqlPool, QueryBuilder};

use super::{Tx, CHUNK};

/// Records the decisions. A decision never changes; a redelivered one is a
/// no-op.
pub async fn insert(tx: &mut Tx<'_>, decisions: &[Decision]) -> Result<(), sqlx::Error> {
    for chunk in decisions.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO intents (intent_id, event_id, user_id, quantity, outcome, reject_reason, decided_at) ",
        );
        q.push_values(chunk, |mut row, d| {
            let reason = match d.outcome {
                Outcome::Held { .. } => None,
                Outcome::Rejected { reason } => Some(reason),
            };
            row.push_bind(d.intent_id.to_string())
                .push_bind(d.event_id)
                .push_bind(&d.user_id)
                .push_bind(d.quantity)
                .push_bind(d.outcome.kind())
                .push_bind(reason)
                .push_bind(from_ms(d.decided_at_ms));
        });
        q.push(" ON DUPLICATE KEY UPDATE intent_id = intent_id");
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A decided intent as the record has it.
#[derive(sqlx::FromRow)]
pub struct RecordedIntent {
    pub intent_id: String,
    pub outcome: OutcomeKind,
    pub reject_reason: Option<RejectReason>,
    pub decided_at: DateTime<Utc>,
}

/// Every decided intent of an event.
pub async fn of_event(db: &MySqlPool, event_id: u64) -> Result<Vec<RecordedIntent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT intent_id, CAST(outcome AS CHAR) AS outcome, reject_reason, decided_at FROM intents WHERE event_id = ?",
    )
    .bind(event_id)
    .fetch_all(db)
    .await
}
