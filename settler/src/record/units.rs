//! `order_units`: which live order owns each unit of an event. The primary
//! key (event, unit) is what makes a unit sold once at most.

use sqlx::{MySql, QueryBuilder};

use super::{push_list, Tx, CHUNK, LOOKUP};

/// The owners of `units` of an event; with `lock`, locked for the
/// transaction (gaps included, where a unit has no owner yet).
pub async fn owners(
    tx: &mut Tx<'_>,
    event_id: u64,
    units: &[u32],
    lock: bool,
) -> Result<Vec<(u32, String)>, sqlx::Error> {
    let mut owners = Vec::new();
    for chunk in units.chunks(LOOKUP) {
        let mut q = QueryBuilder::<MySql>::new("SELECT unit_no, order_id FROM order_units WHERE event_id = ");
        q.push_bind(event_id).push(" AND unit_no IN ");
        push_list(&mut q, chunk);
        if lock {
            q.push(" FOR UPDATE");
        }
        owners.extend(q.build_query_as::<(u32, String)>().fetch_all(&mut **tx).await?);
    }
    Ok(owners)
}

/// Gives each unit to its order: (unit, order).
pub async fn grant(tx: &mut Tx<'_>, event_id: u64, granted: &[(u32, String)]) -> Result<(), sqlx::Error> {
    for chunk in granted.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new("INSERT INTO order_units (event_id, unit_no, order_id) ");
        q.push_values(chunk, |mut row, (unit, order)| {
            row.push_bind(event_id).push_bind(unit).push_bind(order);
        });
        q.push(" ON DUPLICATE KEY UPDATE order_id = VALUES(order_id)");
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Takes every unit from an order.
pub async fn release(tx: &mut Tx<'_>, order_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM order_units WHERE order_id = ?").bind(order_id).execute(&mut **tx).await?;
    Ok(())
}
