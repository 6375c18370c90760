// Shared by Dropline's k6 scenarios: tokens, the API calls a buyer makes,
// and the event every scenario sells.
import http from 'k6/http';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { sleep } from 'k6';

export const API = __ENV.DROPLINE_API || 'http://127.0.0.1:8080';
// The stack's signing secrets (scripts/loadtest.sh exports the ones the
// local stack generated in .dropline/secrets.env). There is no default: a
// published one would be refused by the ingress anyway.
const BUYER_KEY = __ENV.DROPLINE_JWT_SECRET;
const ADMIN_KEY = __ENV.DROPLINE_ADMIN_JWT_SECRET;
const ISSUER = __ENV.DROPLINE_JWT_ISSUER || 'dropline';
if (!BUYER_KEY || !ADMIN_KEY) {
  throw new Error('DROPLINE_JWT_SECRET and DROPLINE_ADMIN_JWT_SECRET must be set (scripts/loadtest.sh sets them)');
}

// 2xx, and the answers a flood is expected to get: 409 (sold out, not
// held) and 429 (rate limited). Anything else counts as a failure.
http.setResponseCallback(http.expectedStatuses({ min: 200, max: 299 }, 409, 429));

function b64url(s) {
  return encoding.b64encode(s, 'rawurl');
}

// An HS256 JWT, as the storefront's login would issue: a buyer's, or with
// admin set an admin's (its own secret and audience).
export function token(sub, admin) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub, iat: now, exp: now + 3600, iss: ISSUER, aud: admin ? 'dropline-admin' : 'dropline-buyer' };
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = crypto.hmac('sha256', admin ? ADMIN_KEY : BUYER_KEY, `${head}.${body}`, 'base64rawurl');
  return `${head}.${body}.${sig}`;
}

export function uuid() {
  const b = new Uint8Array(crypto.randomBytes(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function auth(tok, extra) {
  return { headers: Object.assign({ Authorization: `Bearer ${tok}`, 'Content-Type': 'application/json' }, extra || {}) };
}

// Creates an event on sale now; returns its id.
export function createEvent(capacity, holdTtlSecs, perUserLimit) {
  const now = Date.now();
  const body = {
    name: `k6 drop ${new Date(now).toISOString()}`,
    venue: 'Loopback Arena',
    starts_at: new Date(now + 30 * 86400e3).toISOString(),
    sale_opens_at: new Date(now - 1000).toISOString(),
    sale_closes_at: new Date(now + 6 * 3600e3).toISOString(),
    capacity,
    price_cents: 4500,
    currency: 'EUR',
    per_user_limit: perUserLimit || 2,
    hold_ttl_secs: holdTtlSecs,
  };
  const r = http.post(`${API}/v1/admin/events`, JSON.stringify(body), auth(token('k6-admin', true)));
  if (r.status !== 201) throw new Error(`creating the event: ${r.status} ${r.body}`);
  return r.json('id');
}

export function purchase(tok, eventId, key, quantity) {
  return http.post(`${API}/v1/events/${eventId}/purchases`, JSON.stringify({ quantity: quantity || 1 }),
    Object.assign(auth(tok, { 'Idempotency-Key': key }), { tags: { name: 'purchase' } }));
}

// Polls the intent until it is decided or `deadlineMs` passes; returns the
// status document, or null on timeout.
export function follow(tok, intentId, deadlineMs) {
  let wait = 0.05;
  while (Date.now() < deadlineMs) {
    const r = http.get(`${API}/v1/intents/${intentId}`, Object.assign(auth(tok), { tags: { name: 'intent' } }));
    if (r.status === 200 && r.json('status') !== 'queued') return r.json();
    sleep(wait);
    wait = Math.min(wait * 2, 0.5);
  }
  return null;
}

// A scenario of `rate` iterations a second for `duration`, with `vus` VUs
// ready from the start and at most `maxVUs`: an open model, so a slow
// server meets the same arrival rate, as a flash sale's buyers do.
export function steadyRate(rate, duration, vus, maxVUs) {
  return {
    executor: 'constant-arrival-rate',
    rate,
    timeUnit: '1s',
    duration,
    preAllocatedVUs: vus,
    maxVUs,
  };
}

// Percentiles every scenario reports.
export const SUMMARY_TREND_STATS = ['avg', 'min', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'];

// The SLOs of a buyer's path: the purchase answer, the decision, and
// nothing lost on the way.
// The buyers' SLOs. LATENCY_SLOS=off keeps only the outcome thresholds
// (failures, undecided purchases): the CI smoke runs a debug build on a
// shared 2-core machine, where latency says nothing about Dropline.
const OUTCOME_THRESHOLDS = {
  http_req_failed: ['rate<0.01'],
  dropline_undecided: ['rate==0'],
};
export const BUYER_THRESHOLDS = __ENV.LATENCY_SLOS === 'off' ? OUTCOME_THRESHOLDS : {
  ...OUTCOME_THRESHOLDS,
  'http_req_duration{name:purchase}': ['p(99)<500'],
  dropline_intent_to_decision: ['p(99)<2000'],
};

// A purchase as the README asks a client to make one: a request that got
// no answer (the connection was refused or reset: an ingress died or
// restarted) or a retryable one (503, or 409 idempotency_in_progress while
// a cut-off request still owns the key) is sent again with the same key,
// after its Retry-After, until a final answer or `deadlineMs`. A purchase
// cut off after the ingress produced it is then answered with its intent,
// so the buyers' count of accepted purchases matches the decisions.
// Once a request's fate is unknown, a 429 (shed or rate limited before the
// key was looked at) says nothing about it either, so it is retried too.
export function purchaseUntilAnswered(tok, eventId, key, deadlineMs) {
  let unknown = false;
  for (;;) {
    const r = purchase(tok, eventId, key, 1);
    unknown = unknown || r.status === 0 || r.status === 503;
    const retryable = r.status === 0 || r.status === 503 || (unknown && r.status === 429)
      || (r.status === 409 && r.json('code') === 'idempotency_in_progress');
    if (!retryable || Date.now() >= deadlineMs) return r;
    sleep(Math.min(parseInt(r.headers['Retry-After'] || '1', 10) || 1, 5));
  }
}

// Purchases one unit (retried as above) and follows the intent for up to
// 30 s. Records the decision time in `decision` and whether it never came
// in `undecided`. Returns the purchase response and the decided status (or
// null).
export function buyAndFollow(tok, eventId, decision, undecided) {
  const started = Date.now();
  const response = purchaseUntilAnswered(tok, eventId, uuid(), started + 30000);
  if (response.status !== 202) return { response, status: null };
  const status = follow(tok, response.json('intent_id'), started + 30000);
  undecided.add(status === null);
  if (status !== null) decision.add(Date.now() - started);
  return { response, status };
}

// Opens a payment and completes it at the provider; returns what Dropline
// recorded (captured or refund_required), or null.
export function pay(tok, orderId) {
  const r = http.post(`${API}/v1/orders/${orderId}/payments`, null, Object.assign(auth(tok), { tags: { name: 'payment' } }));
  if (r.status !== 201) return null;
  const c = http.post(`${r.json('checkout_url')}/confirm?wait=true`, null, { tags: { name: 'checkout' } });
  if (c.status !== 200) return null;
  return JSON.parse(c.json('webhook_body')).status;
}

export function cancel(tok, orderId) {
  return http.post(`${API}/v1/orders/${orderId}/cancel`, null, Object.assign(auth(tok), { tags: { name: 'cancel' } }));
}

function fmt(v) {
  return typeof v === 'number' ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2)) : String(v);
}

// A short text summary: every threshold with its verdict, and the metrics
// a rehearsal is about.
function text(name, data) {
  const lines = [`\n${name}: thresholds`];
  for (const [metric, m] of Object.entries(data.metrics)) {
    for (const [expr, t] of Object.entries(m.thresholds || {})) {
      lines.push(`  ${t.ok ? 'ok  ' : 'FAIL'} ${metric} ${expr}`);
    }
  }
  lines.push(`${name}: metrics`);
  for (const [metric, m] of Object.entries(data.metrics).sort()) {
    if (!metric.startsWith('dropline_') && !metric.startsWith('http_req_duration') && metric !== 'iterations'
        && metric !== 'http_reqs' && metric !== 'http_req_failed') continue;
    const v = m.values;
    const shown = Object.entries(v).map(([k, x]) => `${k}=${fmt(x)}`).join(' ');
    lines.push(`  ${metric}: ${shown}`);
  }
  return lines.join('\n') + '\n';
}

// Writes the end-of-test summary for the wrapper script (which reads the
// event id from it for the invariant check), and a text summary.
export function summary(name, data) {
  const out = { stdout: text(name, data) };
  out[`${__ENV.DROPLINE_LOADTEST_OUT || 'loadtest/reports'}/${name}-summary.json`] = JSON.stringify(data, null, 2);
  return out;
}
