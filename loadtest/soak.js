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
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Math.min(RATE * 2, 400),
      maxVUs: RATE * 4,
    },
  },
  thresholds: {
    'http_req_duration{name:purchase}': ['p(99)<500'],
    http_req_failed: ['rate<0.01'],
    dropline_intent_to_decision: ['p(99)<2000'],
    dropline_undecided: ['rate==0'],
  },
};

export function setup() {
  // Enough stock that the soak never sells out: it measures steady state.
  return { eventId: dl.createEvent(10000000, 5, 100) };
}

export default function (data) {
  const tok = dl.token(`k6-soak-${dl.uuid()}`);
  const started = Date.now();
  const r = dl.purchase(tok, data.eventId, dl.uuid(), 1);
  check(r, { 'purchase accepted': (x) => x.status === 202 });
  if (r.status !== 202) return;
  const status = dl.follow(tok, r.json('intent_id'), started + 30000);
  undecided.add(status === null);
  if (status === null) return;
  decision.add(Date.now() - started);
  // Half pay, the rest let the 5 s hold expire: the expirer works all along.
  if (status.status === 'held' && Math.random() < 0.5) {
    dl.pay(tok, status.order.order_id);
  }
}

export function handleSummary(data) {
  return dl.summary('soak', data);
}
