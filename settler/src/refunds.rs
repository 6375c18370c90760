//! The refund worker: gives back, through the payment provider, the money
//! of every payment the record keeps for refund (a late payment, one for a
//! voided hold, one that did not match its order).
//!
//! The record writes a refund row in the transaction that marks a payment
//! for refund (the migration's triggers). Every settler runs this worker;
//! each claims the rows due for a while (skipping rows another is claiming)
//! and calls the provider's `POST /v1/refunds` with the refund id as the
//! idempotency key. So a call retried after a timeout, a lost answer or a
//! crash of this process names the same refund, and the provider makes it
//! once: the row records the provider's refund id, unique in the table.
//! A failed call (no answer, a 5xx, 408, 425 or 429, a refund still
//! pending) leaves the row `failed`, tried again after a backoff that
//! doubles up to a cap, for as long as it takes: the money is owed. Any
//! other refusal (the provider does not know the payment, it was refunded
//! already, the key names another refund) or an answer that is not the
//! refund asked for will be the same next time: the row is `rejected`,
//! for an operator, and the stuck-refund alert pages until one acts.

use std::time::Duration;

use chrono::Utc;
use dropline::payments::{CreateRefund, ProviderRefund, REFUND_SUCCEEDED};
use dropline::retry::Backoff;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::{OLDEST_REFUND, REFUNDS_WAITING, REFUND_CALLS};
use crate::record::refunds::{self, Due};

/// Refunds claimed per pass, all called at once: a pass lasts one call's
/// timeout at most, so its claims stay short and a shutdown waits little.
const PER_PASS: u32 = 8;

#[derive(Debug, Clone)]
pub struct RefundOptions {
    /// The provider's API, without a trailing slash.
    pub provider_url: String,
    pub poll: Duration,
    /// One call's limit.
    pub timeout: Duration,
    pub backoff: Backoff,
}

pub struct Refunder {
    pub db: MySqlPool,
    pub http: reqwest::Client,
    pub options: RefundOptions,
}

impl Refunder {
    pub fn new(db: MySqlPool, options: RefundOptions) -> reqwest::Result<Self> {
        let http =
            reqwest::Client::builder().timeout(options.timeout).redirect(reqwest::redirect::Policy::none()).build()?;
        Ok(Self { db, http, options })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(provider = %dropline::config::origin(&self.options.provider_url), "refunding through the provider");
        loop {
            let full = match self.pass().await {
                Ok(n) => n == PER_PASS as usize,
                Err(e) => {
                    tracing::warn!(error = %e, "refund pass failed; trying again");
                    false
                }
            };
            if !full {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.options.poll) => {}
                }
            } else if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Claims the refunds due and calls the provider for each; how many.
    async fn pass(&self) -> Result<usize, sqlx::Error> {
        // A claim outlasts the slowest call, so no other settler calls for
        // the same refund meanwhile (the key would make it harmless, but
        // not free).
        let claim_secs = self.options.timeout.as_secs() + 30;
        let due = refunds::claim(&self.db, PER_PASS, claim_secs).await?;
        let n = due.len();
        futures::future::join_all(due.into_iter().map(|d| self.attempt(d))).await;
        let (waiting, oldest) = refunds::waiting(&self.db).await?;
        ::metrics::gauge!(REFUNDS_WAITING.name).set(waiting as f64);
        ::metrics::gauge!(OLDEST_REFUND.name).set(oldest);
        Ok(n)
    }

    async fn attempt(&self, due: Due) {
        let recorded = match self.call(&due).await {
            Ok(made) => {
                ::metrics::counter!(REFUND_CALLS.name, "result" => "refunded").increment(1);
                tracing::info!(refund_id = %due.refund_id, payment_id = %due.payment_id,
                    provider_refund_id = %made.refund_id, amount_cents = due.amount_cents, "refunded");
                refunds::refunded(&self.db, &due.refund_id, &made.refund_id).await
            }
            Err(e) if e.is_final() => {
                ::metrics::counter!(REFUND_CALLS.name, "result" => "rejected").increment(1);
                tracing::error!(refund_id = %due.refund_id, payment_id = %due.payment_id, error = %e,
                    "the provider refused the refund for good; it waits for an operator");
                refunds::not_made(&self.db, &due.refund_id, &e.to_string(), None).await
            }
            Err(e) => {
                ::metrics::counter!(REFUND_CALLS.name, "result" => "failed").increment(1);
                let wait = self.options.backoff.after(due.attempts + 1);
                tracing::warn!(refund_id = %due.refund_id, payment_id = %due.payment_id, attempts = due.attempts + 1,
                    retry_in_ms = wait.as_millis() as u64, error = %e, "refund call failed; retrying later");
                let next = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_else(|_| chrono::Duration::days(1));
                refunds::not_made(&self.db, &due.refund_id, &e.to_string(), Some(next)).await
            }
        };
        // The claim runs out and the next pass calls again, with the same
        // key: the provider answers the refund it made.
        if let Err(e) = recorded {
            tracing::warn!(refund_id = %due.refund_id, error = %e, "recording a refund call failed; it is called again");
        }
    }

    async fn call(&self, due: &Due) -> Result<ProviderRefund, CallError> {
        let body = CreateRefund { payment_id: due.payment_id.clone(), amount_cents: due.amount_cents };
        let answer = self
            .http
            .post(format!("{}/v1/refunds", self.options.provider_url))
            .header("idempotency-key", &due.refund_id)
            .json(&body)
            .send()
            .await?;
        let status = answer.status();
        if !status.is_success() {
            let text = answer.text().await.unwrap_or_default();
            return Err(CallError::Refused(status.as_u16(), text.chars().take(200).collect()));
        }
        let made: ProviderRefund = answer.json().await?;
        if made.payment_id != due.payment_id
            || made.amount_cents != due.amount_cents
            || made.idempotency_key != due.refund_id
        {
            return Err(CallError::Mismatch(made.refund_id));
        }
        if made.status != REFUND_SUCCEEDED {
            return Err(CallError::Pending(made.refund_id, made.status));
        }
        Ok(made)
    }
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("the provider could not be reached or answered unreadably: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("the provider answered {0}: {1}")]
    Refused(u16, String),
    #[error("the provider's refund {0} is of another payment, amount or key")]
    Mismatch(String),
    #[error("the provider's refund {0} is {1}, not succeeded yet")]
    Pending(String, String),
}

impl CallError {
    /// Whether asking again can only get the same answer.
    fn is_final(&self) -> bool {
        match self {
            CallError::Refused(status, _) => (400..500).contains(status) && !matches!(status, 408 | 425 | 429),
            CallError::Mismatch(_) => true,
            CallError::Transport(_) | CallError::Pending(..) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_that_cannot_change_are_final() {
        let refused = |status| CallError::Refused(status, String::new()).is_final();
        for status in [400, 404, 409, 422] {
            assert!(refused(status), "{status}");
        }
        for status in [408, 425, 429, 500, 502, 503] {
            assert!(!refused(status), "{status}");
        }
        assert!(CallError::Mismatch("re_1".into()).is_final());
        assert!(!CallError::Pending("re_1".into(), "pending".into()).is_final());
    }
}
