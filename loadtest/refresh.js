// The refresh storm: buyers hammering F5 on the event page before and
// during the sale. Reads only.
//
//   scripts/loadtest.sh refresh -e RATE=3000
import { check } from 'k6';
import http from 'k6/http';
import * as dl from './lib.js';

const RATE = parseInt(__ENV.RATE || '1500');
const DURATION = __ENV.DURATION || '30s';

export const options = {
  summaryTrendStats: dl.SUMMARY_TREND_STATS,
  scenarios: {
    refresh: dl.steadyRate(RATE, DURATION, Math.min(RATE, 300), RATE * 2),
  },
  thresholds: {
    'http_req_duration{name:event}': ['p(99)<200'],
    http_req_failed: ['rate<0.001'],
  },
};

export function setup() {
  return { eventId: dl.createEvent(parseInt(__ENV.TICKETS || '1000'), 60, 2) };
}

export default function (data) {
  const r = http.get(`${dl.API}/v1/events/${data.eventId}`, { tags: { name: 'event' } });
  check(r, { 'event answered with availability': (x) => x.status === 200 && x.json('availability') !== null });
}

export function handleSummary(data) {
  return dl.summary('refresh', data);
}
