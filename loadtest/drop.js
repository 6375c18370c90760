// The drop: the sale opens and a crowd far larger than the stock arrives at
// a ramping rate. Each virtual buyer has their own token and idempotency key,
// follows their intent, then pays, cancels or walks away.
//
//   scripts/loadtest.sh drop                      (defaults below)
//   scripts/loadtest.sh drop -e TICKETS=10000 -e PEAK_RATE=2000
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import * as dl from './lib.js';

const TICKETS = parseInt(__ENV.TICKETS || '2000');
const PEAK_RATE = parseInt(__ENV.PEAK_RATE || '800');
const RAMP = __ENV.RAMP || '10s';
const HOLD = __ENV.HOLD || '20s';
const HOLD_TTL_SECS = parseInt(__ENV.HOLD_TTL_SECS || '10');
const PAY_SHARE = parseFloat(__ENV.PAY_SHARE || '0.6');
const CANCEL_SHARE = parseFloat(__ENV.CANCEL_SHARE || '0.15');

const decision = new Trend('dropline_intent_to_decision', true);
const undecided = new Rate('dropline_undecided');
const outcomes = new Counter('dropline_outcomes');
// Milliseconds from the start of the drop to a buyer first being told
// "sold out"; its minimum is the time to sell out.
const soldOutAt = new Trend('dropline_sold_out_after', true);

export const options = {
  summaryTrendStats: dl.SUMMARY_TREND_STATS,
  scenarios: {
    drop: {
      executor: 'ramping-arrival-rate',
      startRate: Math.max(1, Math.floor(PEAK_RATE / 10)),
      timeUnit: '1s',
      preAllocatedVUs: Math.min(PEAK_RATE, 400),
      maxVUs: Math.max(PEAK_RATE * 2, 100),
      stages: [
        { target: PEAK_RATE, duration: RAMP },
        { target: PEAK_RATE, duration: HOLD },
      ],
    },
  },
  thresholds: dl.BUYER_THRESHOLDS,
};

export function setup() {
  return { eventId: dl.createEvent(TICKETS, HOLD_TTL_SECS, 2), started: Date.now() };
}

export default function (data) {
  const tok = dl.token(`k6-${dl.uuid()}`);
  const { response: r, status } = dl.buyAndFollow(tok, data.eventId, decision, undecided);
  check(r, { 'purchase answered 202, 409 or 429': (x) => [202, 409, 429].includes(x.status) });
  if (r.status !== 202) {
    const soldOut = r.status === 409;
    outcomes.add(1, { outcome: soldOut ? 'sold_out_at_door' : 'rate_limited' });
    if (soldOut) soldOutAt.add(Date.now() - data.started);
    return;
  }
  if (status === null) return;
  outcomes.add(1, { outcome: status.status === 'rejected' ? status.reason : 'held' });
  if (status.reason === 'sold_out') soldOutAt.add(Date.now() - data.started);
  if (status.status !== 'held') return;
  const fate = Math.random();
  if (fate < PAY_SHARE) {
    const paid = dl.pay(tok, status.order.order_id);
    check(paid, { 'payment recorded': (p) => p === 'captured' || p === 'refund_required' });
  } else if (fate < PAY_SHARE + CANCEL_SHARE) {
    check(dl.cancel(tok, status.order.order_id), { 'cancel answered': (x) => x.status === 200 || x.status === 409 });
  }
}

export function handleSummary(data) {
  return dl.summary('drop', data);
}
