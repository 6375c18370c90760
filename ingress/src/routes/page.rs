//! The waiting-room page: one small HTML page per event with a room, and
//! its script. The page joins the line, follows the ticket's event stream
//! and buys once admitted, all through the public API; the buyer's token
//! comes in the link's fragment (`#token=…`), which browsers never send.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::rooms::room_of;
use crate::extract::EventId;
use crate::problem::Problem;
use crate::state::AppState;

const PAGE: &str = include_str!("../page/waiting-room.html");
const SCRIPT: &str = include_str!("../page/waiting-room.js");

/// Only the page's own script and the API: nothing else loads or runs.
const POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; \
                      img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /waiting-room/{event_id}`
pub async fn waiting_room(State(app): State<Arc<AppState>>, EventId(event_id): EventId) -> Result<Response, Problem> {
    room_of(&app, event_id).await?;
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, POLICY),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    Ok((headers, PAGE).into_response())
}

/// `GET /assets/waiting-room.js`
pub async fn script() -> Response {
    let headers =
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")];
    (headers, SCRIPT).into_response()
}
