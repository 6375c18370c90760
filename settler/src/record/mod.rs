//! The settler's SQL: what it reads and writes in the record (MySQL), by
//! table: [`intents`], [`orders`], [`payments`], [`units`] (who owns each
//! unit of an event), the [`outbox`] it relays and the [`events`] it
//! reads. Writes take the batch's transaction; what they mean
//! (forward-only orders, one payment row per provider payment) is said at
//! each statement.

pub mod events;
pub mod intents;
pub mod orders;
pub mod outbox;
pub mod payments;
pub mod refunds;
pub mod units;

use sqlx::{MySql, QueryBuilder};

/// Rows per statement; well under MySQL's placeholder limit.
const CHUNK: usize = 500;

/// Values per `IN` list when reading. Longer lists are turned into a
/// derived table by MariaDB (in_predicate_conversion_threshold, 1000), whose
/// plan scans every live order of the event: quadratic over a sale.
const LOOKUP: usize = 200;

/// The settler's transaction.
pub type Tx<'c> = sqlx::Transaction<'c, MySql>;

/// `(?, ?, ...)` for an `IN` list.
fn push_list<'q, T>(q: &mut QueryBuilder<'q, MySql>, items: &[T])
where
    T: 'q + sqlx::Encode<'q, MySql> + sqlx::Type<MySql> + Copy + Send,
{
    q.push("(");
    let mut list = q.separated(", ");
    for item in items {
        list.push_bind(*item);
    }
    list.push_unseparated(")");
}
