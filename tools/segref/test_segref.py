#!/usr/bin/env python3
"""Self-tests of the reference implementation (stdlib only):

  1. every example under examples/ (hand-verified expected output) -- stdout must match exactly,
     and the rejected line numbers on stderr must match expected_rejects;
  2. unit checks: FNV-1a test vectors, RFC 3339 parsing, rule parser / load-time errors;
  3. brute force: on random streams with millisecond-scale times, the candidate-instant timer
     search must give exactly the output of an engine that re-evaluates at EVERY millisecond.

    python3 tools/segref/test_segref.py            # all
    python3 tools/segref/test_segref.py -k since   # examples whose name contains "since"
"""

import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True
sys.path.insert(0, HERE)
import segref  # noqa: E402

FAILS = []


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print('FAIL:', what)


# ---------------------------------------------------------------------------------------------
def run_examples(filt):
    ex_dir = os.path.join(HERE, 'examples')
    for name in sorted(os.listdir(ex_dir)):
        d = os.path.join(ex_dir, name)
        if not os.path.isdir(d) or (filt and filt not in name):
            continue
        args = []
        if os.path.exists(os.path.join(d, 'args')):
            args = open(os.path.join(d, 'args')).read().split()
        p = subprocess.run([sys.executable, os.path.join(HERE, 'segref.py'),
                            '--config', os.path.join(d, 'segments.toml'),
                            '--input', os.path.join(d, 'events.ndjson')] + args,
                           capture_output=True, text=True)
        check(p.returncode == 0, '%s: exit code %d: %s' % (name, p.returncode, p.stderr))
        want = open(os.path.join(d, 'expected.ndjson')).read()
        if p.stdout != want:
            check(False, '%s: stdout differs\n--- got\n%s--- want\n%s' % (name, p.stdout, want))
        rej = [int(m.group(1)) for m in re.finditer(r'^line (\d+): ', p.stderr, re.M)]
        want_rej = [int(x) for x in open(os.path.join(d, 'expected_rejects')).read().split()]
        check(rej == want_rej, '%s: rejected lines %s, want %s' % (name, rej, want_rej))
        print('example %-20s %s' % (name, 'ok' if p.stdout == want and rej == want_rej
                                    else 'FAILED'))


# ---------------------------------------------------------------------------------------------
def unit():
    f = segref.fnv1a64
    check(f('') == 0xcbf29ce484222325, 'fnv empty')
    check(f('a') == 0xaf63dc4c8601ec8c, 'fnv a')
    check(f('foobar') == 0x85944171f73967e8, 'fnv foobar')

    p = segref.parse_rfc3339
    check(p('1970-01-01T00:00:00Z') == 0, 'epoch')
    check(p('2026-11-01T10:00:00.1239Z') == p('2026-11-01T10:00:00Z') + 123, 'frac truncation')
    check(p('2026-11-01T11:00:00+01:00') == p('2026-11-01T10:00:00Z'), 'offset')
    check(p('2026-11-01T09:00:00-01:00') == p('2026-11-01T10:00:00Z'), 'neg offset')
    check(p('2026-02-29T00:00:00Z') is None, 'not a leap year')
    check(p('2028-02-29T00:00:00Z') is not None, 'leap year')
    check(p('1969-12-31T23:59:59Z') is None, 'before 1970')
    check(p('1970-01-01T00:30:00+01:00') is None, 'before 1970 after offset')
    check(p('9999-12-31T23:59:59.999Z') == segref.MAX_MS, 'max')
    check(p('2026-11-01') is None, 'date only')
    check(segref.fmt_ms(p('2026-11-01T10:00:00.5Z')) == '2026-11-01T10:00:00.500Z', 'fmt')

    good = [
        'count("A") >= 1', 'count(any, 7d) > 0 or not trait.x is null',
        'sum("A" where a.b == 1 and "c.d" != "x", "rev", 90s) >= 1.5',
        'trait.country in ["NL", "BE"]', 'trait.plan is not null',
        'last("A") > last("B") and since(last("A")) >= 1h',
        'since(first(any)) / 2 + 1h <= since(last("X")) * 3 - 5m',
        '-count("A") < -1', '(count("A") + 1) * 2 == 4', 'bucket(100) < 10',
        'since(never) >= 1w', 'last("A") == never', 'true', 'not not (1 < 2)',
        'count("A" where x in [1, 2, -3]) >= 1', 'avg("A", nested.price) > 3',
        'since(last("A")) / since(last("B") - 1h) > 0.5 and false',
    ]
    for r in good:
        try:
            ast = segref.Parser(r).parse_rule()
            segref.typecheck(ast, {'x'}, [], set(), [])
        except segref.RuleError as e:
            check(False, 'should parse: %s: %d:%d %s' % (r, e.line, e.col, e.msg))
    bad = [
        ('count("A") >=', 1, 14), ('count("A") = 1', 1, 12), ('count(A) > 1', 1, 7),
        ('count("A", 7) > 1', 1, 12), ('1 < 2 < 3', 1, 7), ('count("A") > 1h', 1, 12),
        ('last("A") > 5', 1, 11), ('since(count("A")) > 1h', 1, 7), ('count("A")', 1, 1),
        ('"a" + 1 > 0', 1, 1), ('trait > 1', 1, 7), ('bucket(0) == 0', 1, 8),
        ('in_segment("nope")', 1, 12), ('1.5h > 1h', 1, 1), ('5x > 1', 1, 1),
        ('count("A" where x is null) > 0', 1, 19), ('foo(1)', 1, 1),
        ('true < false', 1, 6), ('count(any) > 1 and\n  count("A") >', 2, 15),
        ('count("A", 0s) > 0', 1, 12), ('any > 1', 1, 1), ('1h / last("A") > 1', 1, 4),
    ]
    for r, line, col in bad:
        try:
            ast = segref.Parser(r).parse_rule()
            ty, _ = segref.typecheck(ast, {'x'}, [], set(), [])
            if ty not in ('bool', 'dyn', 'null'):
                raise segref.RuleError(1, 1, 'not a condition')
            check(False, 'should be rejected: %r' % r)
        except segref.RuleError as e:
            check((e.line, e.col) == (line, col),
                  'error position for %r: got %d:%d (%s), want %d:%d'
                  % (r, e.line, e.col, e.msg, line, col))
    # limits of the oracle (non-linear in time) are flagged, not silently wrong
    lim = []
    segref.typecheck(segref.Parser('since(last("A")) / 1h * since(last("B")) > 1h').parse_rule(),
                     set(), [], set(), lim)
    check(len(lim) == 1, 'non-linear product flagged')
    # config: cycles, unknown segment, duplicate ids
    for toml, frag in [
        ('[[segment]]\nid="a"\nrule=\'in_segment("b")\'\n[[segment]]\nid="b"\n'
         'rule=\'in_segment("a")\'\n', 'cycle'),
        ('[[segment]]\nid="a"\nrule=\'in_segment("a")\'\n', 'cycle'),
        ('[[segment]]\nid="a"\nrule=\'in_segment("zz")\'\n', 'unknown segment'),
        ('[[segment]]\nid="a"\nrule="true"\n[[segment]]\nid="a"\nrule="true"\n', 'duplicate'),
        ('[[segment]]\nid="A-b"\nrule="true"\n', 'id must match'),
    ]:
        with tempfile.NamedTemporaryFile('w', suffix='.toml', delete=False) as tf:
            tf.write(toml)
        try:
            segref.load_config(tf.name)
            check(False, 'config should be rejected (%s)' % frag)
        except segref.ConfigError as e:
            check(frag in str(e), 'config error %r should mention %r' % (str(e), frag))
        finally:
            os.unlink(tf.name)


# ---------------------------------------------------------------------------------------------
class BruteEngine(segref.Engine):
    """re-evaluates every customer at every single millisecond: no candidate instants at all."""

    def reset_search(self, c, t0, roots):
        c.last_eval = t0
        c.scanned = t0
        c.found = None

    def next_change(self, c, limit):
        if c.found is not None:
            return c.found[0] if c.found[0] <= limit else None
        t = c.scanned + 1
        while t <= limit:
            values, roots = self.evaluate(c, t)
            if values != c.member:
                c.found = (t, values, roots)
                c.scanned = t
                return t
            t += 1
        c.scanned = limit
        return None


BRUTE_RULES = [
    'last("A") > last("B") and since(last("A")) >= 40ms',
    'since(last(any)) >= 150ms',
    'count("A", 50ms) >= 2',
    'count(any, 120ms) == 1 or count("B", 30ms) >= 1',
    'sum("B", "v", 80ms) >= 5',
    'max("A", "v", 60ms) > 2 and min("A", "v", 60ms) <= 2',
    'since(last("A")) / 2 > since(last("B"))',
    'since(last("A")) >= since(last("B")) * 3 - 20ms',
    'since(first(any)) * 3 >= 100ms and since(first(any)) * 3 < 200ms',
    'since(last("B")) == 35ms',
    'since(last("A")) - since(first("A")) / 7 > 13ms',
    'since(last("A") + 25ms) >= 10ms',
    'since(last("B")) in [7ms, 33ms, 50ms]',
    'since(last("A")) / count("A", 90ms) > 11ms',
    'not in_segment("s0") and count("B", 100ms) >= 1',
    'in_segment("s2") or since(last("B")) / 3 >= 17ms',
]


def brute(n_streams, seed):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as td:
        cfgp = os.path.join(td, 'c.toml')
        with open(cfgp, 'w') as f:
            for i, r in enumerate(BRUTE_RULES):
                f.write("[[segment]]\nid = \"s%d\"\nrule = '%s'\n\n" % (i, r))
        cfg = segref.load_config(cfgp)
        total = 0
        for k in range(n_streams):
            base = 1_800_000_000_000
            now = base
            events = []
            for i in range(rng.randint(1, 14)):
                now += rng.choice([0, 1, 3, 10, 17, 25, 40, 70, 130])
                ts = now - rng.choice([0, 0, 0, 0, 5, 30, 200]) if i else now
                ev = {'cid': rng.choice(['c1', 'c2', 'c3']),
                      'type': 'track', 'name': rng.choice(['A', 'B', 'C']),
                      'ts': ts, 'mid': None,
                      'props': {'v': rng.choice([0, 1, 2, 3, 4.5])}, 'traits': None}
                events.append(ev)
            until = now + rng.choice([0, 50, 400])
            outs = []
            for cls in (segref.Engine, BruteEngine):
                buf = io.StringIO()
                eng = cls(cfg, buf)
                for ev in events:
                    eng.accept(dict(ev))
                eng.until(until)
                outs.append(buf.getvalue())
            total += outs[0].count('\n')
            if outs[0] != outs[1]:
                check(False, 'brute force mismatch on stream %d:\n%s\n--- candidates\n%s'
                      '--- brute\n%s' % (k, json.dumps(events), outs[0], outs[1]))
                return
        print('brute force: %d streams, %d changes, identical' % (n_streams, total))


def generated():
    """gen_stream is deterministic; segref output on it keeps SPEC §5 invariants."""
    gen = [sys.executable, os.path.join(HERE, 'gen_stream.py'), '--seed', '11', '--customers',
           '12', '--events', '300', '--idle', '0.05']
    a = subprocess.run(gen, capture_output=True, check=True).stdout
    b = subprocess.run(gen, capture_output=True, check=True).stdout
    check(a == b, 'gen_stream is not deterministic')
    p = subprocess.run([sys.executable, os.path.join(HERE, 'segref.py'), '--config',
                        os.path.join(HERE, 'differential.toml'), '--input', '-',
                        '--until', '2030-01-01T00:00:00Z'], input=a, capture_output=True)
    check(p.returncode == 0, 'segref on generated stream: exit %d %s' % (p.returncode, p.stderr))
    seqs, last_at, n = {}, {}, 0
    for line in p.stdout.decode().splitlines():
        d = json.loads(line)
        n += 1
        k = (d['customer_id'], d['segment'])
        s = seqs.get(k, 0)
        check(d['seq'] == s + 1, 'seq continuity %s' % line)
        check(d['change'] == ('entered' if s % 2 == 0 else 'exited'), 'alternation %s' % line)
        seqs[k] = d['seq']
        check(last_at.get(d['customer_id'], '') <= d['at'], 'per-customer at order %s' % line)
        last_at[d['customer_id']] = d['at']
        check((d['cause'] == 'timer') == ('message_id' not in d and d['cause'] != 'event')
              or d['cause'] == 'event', 'cause/message_id %s' % line)
    print('generated stream: %d changes, invariants hold' % n)


def main():
    filt = None
    if '-k' in sys.argv:
        filt = sys.argv[sys.argv.index('-k') + 1]
    run_examples(filt)
    if filt is None:
        unit()
        generated()
        brute(int(os.environ.get('SEGREF_BRUTE_STREAMS', '50')), 7)
    print('FAILED: %d' % len(FAILS) if FAILS else 'all ok')
    return 1 if FAILS else 0


if __name__ == '__main__':
    sys.exit(main())
