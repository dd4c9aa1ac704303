#!/usr/bin/env python3
"""Seeded random NDJSON event stream for differential tests of `segmenter replay` vs segref.

    python3 tools/segref/gen_stream.py --seed 7 --customers 20 --events 400 > events.ndjson

Same seed + same options -> byte-identical output. Produces:
  * track events: Product Viewed, Product Added, Checkout Started, Order Completed (revenue,
    currency), Email Opened; page; screen; identify (a random subset of country/plan/age traits,
    sometimes a null value);
  * timestamps mostly increasing with gaps from milliseconds to days (so windows slide and
    `since` thresholds are crossed between events), in three encodings: RFC 3339 UTC with
    milliseconds, RFC 3339 with an offset, epoch milliseconds as a JSON number;
  * late events (`--late`), mostly minutes late, sometimes days;
  * duplicate deliveries (`--dup`): an earlier line re-sent verbatim (same messageId), usually soon,
    sometimes more than a day later (then it is NOT a duplicate under the default 24h window);
  * events without messageId, customers identified only by anonymousId or by an integer userId;
  * malformed lines (`--malformed`): not JSON, not an object, missing/unknown type, no customer id,
    bad timestamp, track without event name, properties/traits not an object.

Revenue values are multiples of 0.25 so that binary floating point sums are exact (the reference
uses exact decimals; a float engine must agree on them).
"""

import argparse
import json
import random
import sys
from datetime import datetime, timedelta, timezone

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR


def fmt(ms, rng):
    """encode epoch ms as one of the accepted timestamp forms."""
    r = rng.random()
    dt = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=ms)
    if r < 0.70:
        return dt.strftime('%Y-%m-%dT%H:%M:%S.') + '%03dZ' % (ms % 1000)
    if r < 0.85:
        off = rng.choice([60, 120, -300, 330, -60])
        local = dt + timedelta(minutes=off)
        sign = '+' if off >= 0 else '-'
        s = local.strftime('%Y-%m-%dT%H:%M:%S')
        if ms % 1000 or rng.random() < 0.5:
            s += '.%03d' % (ms % 1000)
        return s + '%s%02d:%02d' % (sign, abs(off) // 60, abs(off) % 60)
    return ms  # epoch milliseconds as a JSON number


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--customers', type=int, default=10)
    ap.add_argument('--events', type=int, default=200, help='lines to produce')
    ap.add_argument('--start', default='2026-11-01T00:00:00Z')
    ap.add_argument('--late', type=float, default=0.04, help='share of late events')
    ap.add_argument('--dup', type=float, default=0.04, help='share of duplicate deliveries')
    ap.add_argument('--malformed', type=float, default=0.02, help='share of malformed lines')
    ap.add_argument('--idle', type=float, default=0.03,
                    help='chance of a long pause (days) before an event')
    ap.add_argument('--suggest-until', action='store_true',
                    help='print only the suggested --until (last event time + 60d) and exit')
    a = ap.parse_args()

    rng = random.Random(a.seed)
    start = datetime.strptime(a.start.replace('Z', '+0000'), '%Y-%m-%dT%H:%M:%S%z')
    now = int(start.timestamp() * 1000) + rng.randrange(1000)
    custs = ['c-%d' % (i + 1) for i in range(a.customers)]
    weights = [1.0 / (i + 1) ** 0.7 for i in range(a.customers)]   # a few heavy users
    anon_only = set(rng.sample(custs, max(0, a.customers // 8)))
    int_ids = {c: 1000 + i for i, c in enumerate(rng.sample(custs, max(0, a.customers // 10)))}

    kinds = [('Product Viewed', 28), ('Product Added', 15), ('Checkout Started', 6),
             ('Order Completed', 9), ('Email Opened', 12), ('page', 16), ('screen', 2),
             ('identify', 8)]
    names = [k for k, _ in kinds]
    kw = [w for _, w in kinds]

    sent = []       # (line, ts) of earlier good lines, for duplicates
    out = []
    mid = 0
    last_ts = now
    for _ in range(a.events):
        r = rng.random()
        if r < a.malformed:
            out.append(malformed(rng, now))
            continue
        if r < a.malformed + a.dup and sent:
            # re-deliver an earlier line verbatim: usually a recent one
            if rng.random() < 0.8:
                line = sent[-1 - min(len(sent) - 1, int(rng.expovariate(0.3)))]
            else:
                line = rng.choice(sent)
            out.append(line)
            continue
        # advance the clock
        g = rng.random()
        if g < a.idle:
            now += rng.randrange(2 * DAY, 40 * DAY)
        elif g < 0.25:
            now += rng.randrange(0, 2000)                 # bursts: ms apart
        elif g < 0.80:
            now += rng.randrange(MIN, 45 * MIN)
        else:
            now += rng.randrange(HOUR, 20 * HOUR)
        now += rng.randrange(1000)
        ts = now
        if rng.random() < a.late:
            ts = now - (rng.randrange(MIN, 3 * HOUR) if rng.random() < 0.8
                        else rng.randrange(DAY, 5 * DAY))
        last_ts = max(last_ts, now)
        c = rng.choices(custs, weights)[0]
        kind = rng.choices(names, kw)[0]
        ev = {}
        if kind == 'identify':
            ev['type'] = 'identify'
        elif kind in ('page', 'screen'):
            ev['type'] = kind
            ev['name'] = rng.choice(['Home', 'Cart', 'Product', 'Checkout'])
        else:
            ev['type'] = 'track'
            ev['event'] = kind
        if c in anon_only:
            ev['anonymousId'] = c
        elif c in int_ids:
            ev['userId'] = int_ids[c]
        else:
            ev['userId'] = c
            if rng.random() < 0.1:
                ev['anonymousId'] = 'anon-' + c
        if rng.random() < 0.95:
            mid += 1
            ev['messageId'] = 'm-%d-%d' % (a.seed, mid)
        ev['timestamp'] = fmt(ts, rng)
        if kind == 'identify':
            traits = {}
            for key, vals in (('country', ['NL', 'BE', 'DE', 'FR', 'US', None]),
                              ('plan', ['free', 'pro', 'enterprise', None]),
                              ('age', [19, 25, 31, 42, 58, 67, None])):
                if rng.random() < 0.6:
                    traits[key] = rng.choice(vals)
            ev['traits'] = traits
        elif kind == 'Order Completed':
            props = {'currency': rng.choice(['EUR', 'EUR', 'USD', 'GBP'])}
            if rng.random() < 0.95:
                props['revenue'] = rng.randrange(1, 1600) * 0.25
            if rng.random() < 0.3:
                props['coupon'] = rng.choice([True, False])
            ev['properties'] = props
        elif kind in ('Product Viewed', 'Product Added'):
            ev['properties'] = {'sku': 'sku-%d' % rng.randrange(20),
                                'price': rng.randrange(1, 400) * 0.25,
                                'category': rng.choice(['shoes', 'books', 'toys'])}
        elif kind == 'Email Opened':
            ev['properties'] = {'campaign': rng.choice(['welcome', 'promo', 'winback'])}
        line = json.dumps(ev, separators=(',', ':'))
        sent.append(line)
        out.append(line)

    if a.suggest_until:
        dt = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=last_ts + 60 * DAY)
        print(dt.strftime('%Y-%m-%dT%H:%M:%S.') + '%03dZ' % ((last_ts + 60 * DAY) % 1000))
        return 0
    sys.stdout.write('\n'.join(out) + ('\n' if out else ''))
    return 0


def malformed(rng, now):
    ts = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=now)
    iso = ts.strftime('%Y-%m-%dT%H:%M:%S.000Z')
    far = '2031-01-01T00:00:00Z'   # rejected lines must not move the clock
    return rng.choice([
        '{"type":"track","event":"Product Viewed","userId":"c-1",',
        'this is not json',
        '["an","array"]',
        '{"event":"Product Viewed","userId":"c-1","timestamp":"%s"}' % far,
        '{"type":"alias","userId":"c-1","previousId":"x","timestamp":"%s"}' % far,
        '{"type":"track","event":"Product Viewed","timestamp":"%s"}' % far,
        '{"type":"track","event":"Product Viewed","userId":"c-1","timestamp":"yesterday"}',
        '{"type":"track","event":"Product Viewed","userId":"c-1","timestamp":"2026-02-30T00:00:00Z"}',
        '{"type":"track","event":"Product Viewed","userId":"c-1"}',
        '{"type":"track","userId":"c-1","timestamp":"%s"}' % far,
        '{"type":"track","event":"","userId":"c-1","timestamp":"%s"}' % far,
        '{"type":"track","event":"Order Completed","userId":"c-1","timestamp":"%s",'
        '"properties":[1,2]}' % iso,
        '{"type":"identify","userId":"c-1","timestamp":"%s","traits":"pro"}' % iso,
        '{"type":"page","userId":"c-1","timestamp":-5}',
        '{"type":"page","userId":"c-1","timestamp":true}',
        '{"type":"page","userId":null,"anonymousId":"","timestamp":"%s"}' % far,
    ])


if __name__ == '__main__':
    sys.exit(main())
