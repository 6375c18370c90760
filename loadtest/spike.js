// The spike: 150% of the drop's peak rate at once. The ingress must shed the
// excess as 429s (or 409 once sold out), never as 5xx or timeouts.
//
//   scripts/loadtest.sh spike -e PEAK_RATE=800
import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import * as dl from './lib.js';

const PEAK_RATE = parseInt(__ENV.PEAK_RATE || '800');
const RATE = Math.ceil(PEAK_RATE * 1.5);
const DURATION = __ENV.DURATION || '20s';

const serverErrors = new Rate('dropline_5xx');
const shed = new Counter('dropline_shed_429');

export const options = {
  summaryTrendStats: dl.SUMMARY_TREND_STATS,
  scenarios: {
    spike: dl.steadyRate(RATE, DURATION, Math.min(RATE, 600), RATE * 2),
  },
  thresholds: {
    dropline_5xx: ['rate==0'],
    http_req_failed: ['rate==0'],
    'http_req_duration{name:purchase}': ['p(99)<1000', 'max<5000'],
  },
};

export function setup() {
  return { eventId: dl.createEvent(parseInt(__ENV.TICKETS || '5000'), 10, 2) };
}

export default function (data) {
  const r = dl.purchase(dl.token(`k6-spike-${dl.uuid()}`), data.eventId, dl.uuid(), 1);
  serverErrors.add(r.status >= 500 || r.status === 0);
  if (r.status === 429) shed.add(1);
  check(r, { 'answered 202, 409 or 429': (x) => [202, 409, 429].includes(x.status) });
}

export function handleSummary(data) {
  return dl.summary('spike', data);
}
