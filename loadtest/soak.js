// The soak: a steady stream of buyers for many minutes against a large
// stock, to catch leaks, slow drift and growth that a short drop hides.
//
//   scripts/loadtest.sh soak -e DURATION=30m -e RATE=200
import { check } from 'k6';
import { Rate, Trend } from 'k6/metrics';
import * as dl from './lib.js';

const RATE = parseInt(__ENV.RATE || '150');
const DURATION = __ENV.DURATION || '10m';

const decision = new Trend('dropline_intent_to_decision', true);
const undecided = new Rate('dropline_undecided');

export const options = {
  summaryTrendStats: dl.SUMMARY_TREND_STATS,
  scenarios: {
    soak: dl.steadyRate(RATE, DURATION, Math.min(RATE * 2, 400), RATE * 4),
  },
  thresholds: dl.BUYER_THRESHOLDS,
};

export function setup() {
  // Enough stock that the soak never sells out: it measures steady state.
  return { eventId: dl.createEvent(10000000, 5, 100) };
}

export default function (data) {
  const tok = dl.token(`k6-soak-${dl.uuid()}`);
  const { response: r, status } = dl.buyAndFollow(tok, data.eventId, decision, undecided);
  check(r, { 'purchase accepted': (x) => x.status === 202 });
  if (status === null) return;
  // Half pay, the rest let the 5 s hold expire: the expirer works all along.
  if (status.status === 'held' && Math.random() < 0.5) {
    dl.pay(tok, status.order.order_id);
  }
}

export function handleSummary(data) {
  return dl.summary('soak', data);
}
