// Dropline's waiting-room page: takes the buyer's place in an event's line,
// shows it live over the ticket's event stream, and buys once admitted.
// Plain JavaScript, no build step; it talks only to the ingress's API.
'use strict';

const eventId = location.pathname.split('/').pop();
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'dropline-buyer-token';
const wait = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let token = null;

// The buyer's token: from the link's fragment (never sent to a server),
// kept for this tab only.
function takeToken() {
  const fromLink = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromLink) {
    sessionStorage.setItem(TOKEN_KEY, fromLink);
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(path, options = {}) {
  const headers = Object.assign({ authorization: `Bearer ${token}` }, options.headers || {});
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (_) {
    return { status: 0, ok: false, body: null, retryAfter: 1 };
  }
  let body = null;
  if (response.status !== 204) {
    try { body = await response.json(); } catch (_) { body = null; }
  }
  const retryAfter = Number(response.headers.get('retry-after')) || 0;
  return { status: response.status, ok: response.ok, body, retryAfter };
}

// A refusal worth retrying: rate limits, overload, a dependency down, or
// no answer at all.
const retryable = (r) => r.status === 0 || r.status === 429 || r.status === 503 ||
  (r.body && r.body.code === 'idempotency_in_progress');

// --- SHA-256, for the join's proof of work -------------------------------
// Plain JavaScript: it needs no secure context, and short inputs hash
// faster here than through crypto.subtle's promises.
const PRIMES = [];
for (let n = 2; PRIMES.length < 64; n++) {
  if (PRIMES.every((p) => n % p !== 0)) PRIMES.push(n);
}
const frac32 = (x) => Math.floor((x - Math.floor(x)) * 0x100000000) >>> 0;
const K = PRIMES.map((p) => frac32(Math.cbrt(p)));
const H0 = PRIMES.slice(0, 8).map((p) => frac32(Math.sqrt(p)));
const ror = (x, n) => (x >>> n) | (x << (32 - n));

function sha256Words(bytes) {
  const blocks = new Uint8Array(((bytes.length + 8) >> 6) * 64 + 64);
  blocks.set(bytes);
  blocks[bytes.length] = 0x80;
  const view = new DataView(blocks.buffer);
  const bits = bytes.length * 8;
  view.setUint32(blocks.length - 8, Math.floor(bits / 0x100000000));
  view.setUint32(blocks.length - 4, bits >>> 0);
  const h = H0.slice();
  const w = new Uint32Array(64);
  for (let at = 0; at < blocks.length; at += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(at + i * 4);
    for (let i = 16; i < 64; i++) {
      const s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, k] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) >>> 0;
      const t2 = ((ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      k = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    [a, b, c, d, e, f, g, k].forEach((v, i) => { h[i] = (h[i] + v) >>> 0; });
  }
  return h;
}

function leadingZeroBits(words) {
  let zeros = 0;
  for (const word of words) {
    if (word !== 0) return zeros + Math.clz32(word);
    zeros += 32;
  }
  return zeros;
}

// The proof a room asks to join: a nonce such that SHA-256(challenge ":"
// nonce) starts with `bits` zero bits. Solved in slices, so the page
// keeps drawing.
async function solve(challenge, bits) {
  const encoder = new TextEncoder();
  const prefix = `${challenge}:`;
  for (let nonce = 0; ; nonce++) {
    if (leadingZeroBits(sha256Words(encoder.encode(prefix + nonce))) >= bits) return prefix + nonce;
    if (nonce % 4096 === 4095) {
      $('detail').textContent = `Proving you are not a script… ${nonce + 1} tries`;
      await wait(0);
    }
  }
}

// --- Event streams --------------------------------------------------------
// Read with fetch, so the token goes in a header (EventSource cannot send
// one). Reconnects with Last-Event-ID; polls while the ingress has no
// stream to spare.
async function follow(path, poll, onState, isFinal) {
  let last = null;
  let retry = 2000;
  for (;;) {
    const headers = { authorization: `Bearer ${token}`, accept: 'text/event-stream' };
    if (last) headers['last-event-id'] = last;
    // A connection that goes silent (no event, no heartbeat) for this
    // long is taken for dead and replaced.
    const abort = new AbortController();
    let silence = null;
    const quiet = () => {
      clearTimeout(silence);
      silence = setTimeout(() => abort.abort(), 45000);
    };
    let response = null;
    quiet();
    try { response = await fetch(path, { headers, signal: abort.signal }); } catch (_) { response = null; }
    if (response && response.status === 204) return;
    if (response && response.ok && response.body) {
      let state = null;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          quiet();
          buffer += value;
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const event = parseEvent(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
            if (!event) continue;
            if (event.id) last = event.id;
            if (event.retry) retry = event.retry;
            state = JSON.parse(event.data);
            onState(state);
          }
        }
      } catch (_) { /* dropped: reconnect below */ }
      clearTimeout(silence);
      if (state && isFinal(state)) return;
    } else if (response && !retryable({ status: response.status, body: null })) {
      clearTimeout(silence);
      const problem = await response.json().catch(() => null);
      showProblem(problem);
      return;
    } else {
      clearTimeout(silence);
      // No stream now: one poll keeps the page true until it reconnects.
      const r = await api(poll);
      if (r.ok) {
        onState(r.body);
        if (isFinal(r.body)) return;
      }
      retry = Math.max(retry, (r.retryAfter || 2) * 1000);
    }
    await wait(retry);
  }
}

function parseEvent(block) {
  const event = { id: null, data: [], retry: 0 };
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'id') event.id = value;
    else if (field === 'data') event.data.push(value);
    else if (field === 'retry') event.retry = Number(value) || 0;
  }
  return event.data.length ? { id: event.id, retry: event.retry, data: event.data.join('\n') } : null;
}

// --- The ticket -------------------------------------------------------------
const TICKET_TEXT = {
  pre_queue: 'You are in the pre-queue. Everyone here gets a random place when the sale opens.',
  drawing: 'The sale is open: drawing places…',
  waiting: 'You are in line.',
  waitlisted: 'You are on the waitlist: you move up as winners let their turn pass.',
  sold_out: 'Sold out for now. Stay here: if held tickets come back, the line moves again.',
  admitted: 'It is your turn!',
  purchased: 'You bought with your turn.',
  lapsed: 'Your turn ran out. Reload the page to join again, at the back.',
  closed: 'The sale has closed.',
};
const TICKET_FINAL = new Set(['purchased', 'lapsed', 'closed']);

let admission = null;
let turnEnds = null;
let firstAhead = null;

function showTicket(t) {
  const status = $('status');
  status.dataset.status = t.status;
  status.textContent = TICKET_TEXT[t.status] || t.status;
  $('place').textContent = t.place ?? '–';
  $('ahead').textContent = t.ahead ?? '–';
  $('serving').textContent = t.now_serving ?? '–';
  $('eta').textContent = t.estimated_wait_secs != null ? duration(t.estimated_wait_secs) : '–';
  if (t.status === 'pre_queue' || t.status === 'drawing') {
    $('detail').textContent = `The draw is at ${new Date(t.draw_at).toLocaleTimeString()}.`;
  } else {
    $('detail').textContent = '';
  }
  if (t.ahead != null) {
    if (firstAhead === null || t.ahead > firstAhead) firstAhead = t.ahead;
    const progress = $('progress');
    progress.hidden = false;
    progress.value = firstAhead === 0 ? 1 : 1 - t.ahead / firstAhead;
  }
  const admitted = t.status === 'admitted' && t.admission_token;
  admission = admitted ? t.admission_token : admission;
  turnEnds = admitted ? new Date(t.turn_ends_at) : turnEnds;
  $('turn').hidden = !admitted;
  if (admitted) $('progress').value = 1;
}

function duration(secs) {
  if (secs < 60) return `${secs} s`;
  const minutes = Math.floor(secs / 60);
  return minutes < 60 ? `${minutes} min ${secs % 60} s` : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function tickCountdown() {
  if (!turnEnds || $('turn').hidden) return;
  const left = Math.max(0, Math.round((turnEnds - Date.now()) / 1000));
  $('countdown').textContent = `${left} s left to buy.`;
  if (left === 0) $('buy').disabled = true;
}

function showProblem(problem) {
  $('detail').textContent = problem ? (problem.detail || problem.title || problem.code) : 'Something went wrong.';
}

async function join() {
  const path = `/v1/events/${eventId}/queue`;
  let headers = {};
  for (;;) {
    const r = await api(path, { method: 'POST', headers });
    if (r.ok) return r.body;
    const code = r.body && r.body.code;
    if (code === 'proof_invalid') {
      // Expired (the line opened long after it was solved) or made too
      // easy by a change of difficulty: solve a fresh one.
      headers = {};
      continue;
    }
    if (code === 'proof_required') {
      const challenge = await api(`${path}/challenge`);
      if (!challenge.ok) { await wait(1000 * (challenge.retryAfter || 1)); continue; }
      headers = { 'dropline-proof': await solve(challenge.body.challenge, challenge.body.difficulty_bits) };
      $('detail').textContent = '';
      continue;
    }
    if (code === 'queue_not_open') {
      $('status').textContent = 'The line has not opened yet; this page joins as soon as it does.';
      headers = {};
      await wait(1000 * Math.min(r.retryAfter || 1, 30));
      continue;
    }
    if (code === 'sold_out') {
      // Nobody waiting and nothing left; joins reopen if held tickets
      // come back.
      $('status').dataset.status = 'sold_out';
      $('status').textContent = TICKET_TEXT.sold_out;
      await wait(1000 * Math.max(r.retryAfter || 5, 1));
      continue;
    }
    if (retryable(r)) { await wait(1000 * (r.retryAfter || 1)); continue; }
    $('status').dataset.status = code || 'error';
    $('status').textContent = r.body ? r.body.title : 'Could not join.';
    showProblem(r.body);
    return null;
  }
}

// --- Buying -----------------------------------------------------------------
const PURCHASE_TEXT = {
  queued: (s) => `Your purchase is being decided${s.ahead != null ? ` (${s.ahead} ahead)` : ''}…`,
  held: (s) => `Held for you until ${new Date(s.order.expires_at).toLocaleTimeString()}. Pay to keep it.`,
  paid: () => 'Paid. Enjoy the show!',
  rejected: (s) => `Not this time: ${(s.reason || 'refused').replace('_', ' ')}.`,
  cancelled: () => 'You cancelled this order.',
  expired: () => 'The hold ran out before it was paid.',
  voided: () => 'The order was withdrawn; any payment is refunded.',
};

function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function showPurchase(s) {
  $('purchase').hidden = false;
  $('purchase').dataset.status = s.status;
  $('purchase-status').textContent = (PURCHASE_TEXT[s.status] || (() => s.status))(s);
  $('pay').hidden = s.status !== 'held';
  $('pay').onclick = () => pay(s.order.order_id);
}

async function buy() {
  $('buy').disabled = true;
  const key = randomKey();
  const quantity = Math.max(1, Number($('quantity').value) || 1);
  for (;;) {
    const r = await api(`/v1/events/${eventId}/purchases`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': key, 'dropline-admission': admission },
      body: JSON.stringify({ quantity }),
    });
    if (r.status === 202) {
      $('turn').hidden = true;
      const id = r.body.intent_id;
      showPurchase({ status: 'queued' });
      follow(`/v1/intents/${id}/events`, `/v1/intents/${id}`, showPurchase, (s) => !['queued', 'held'].includes(s.status));
      return;
    }
    if (retryable(r)) { await wait(1000 * (r.retryAfter || 1)); continue; }
    showProblem(r.body);
    $('buy').disabled = false;
    return;
  }
}

async function pay(orderId) {
  $('pay').disabled = true;
  const r = await api(`/v1/orders/${orderId}/payments`, { method: 'POST' });
  if (r.ok && r.body.checkout_url) {
    location.assign(r.body.checkout_url);
    return;
  }
  showProblem(r.body);
  $('pay').disabled = false;
}

// --- The page -----------------------------------------------------------------
async function start() {
  // First: the token leaves the address bar before anything else happens.
  token = takeToken();
  $('event-id').textContent = eventId;
  const event = await fetch(`/v1/events/${eventId}`).then((r) => r.json()).catch(() => null);
  if (event && event.name) {
    $('event-name').textContent = event.name;
    const price = (event.price_cents / 100).toLocaleString(undefined, { style: 'currency', currency: event.currency });
    $('event-meta').textContent = `${event.venue} · ${new Date(event.starts_at).toLocaleString()} · ${price}`;
  }
  const room = await fetch(`/v1/events/${eventId}/waiting-room`).then((r) => r.json()).catch(() => null);
  if (room && room.seed_commitment) $('commitment').textContent = room.seed_commitment;

  if (!token) {
    $('signin').hidden = false;
    $('signin-form').onsubmit = (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $('token-input').value.trim());
      location.reload();
    };
    return;
  }
  $('room').hidden = false;
  $('buy').onclick = buy;
  setInterval(tickCountdown, 500);
  const ticket = await join();
  if (!ticket) return;
  showTicket(ticket);
  const path = `/v1/events/${eventId}/queue`;
  await follow(`${path}/events`, path, showTicket, (t) => TICKET_FINAL.has(t.status));
}

start();
