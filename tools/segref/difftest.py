#!/usr/bin/env python3
"""Differential test: `segmenter replay` vs the reference segref.py on generated streams.

    python3 tools/segref/difftest.py --segmenter target/debug/segmenter --seeds 1-20
    python3 tools/segref/difftest.py --segmenter target/debug/segmenter --seeds 5 --keep /tmp/d

For each seed: gen_stream.py -> events.ndjson; both programs run with the same --config
(default differential.toml) and --until (the generator's suggestion); compared are
  * stdout: the sequence of change records, each projected onto
    customer_id, segment, change, at, seq, cause, message_id  (extra fields such as id or
    segment_version are ignored; `at` is compared as an instant, so "…00.000Z" == "…00Z");
  * stderr: the set of rejected line numbers (`line N: …`); the reasons' wording is not compared.
Exit status 1 on the first difference (printed with some context), 0 if all seeds agree.
`--segmenter` may be any command line (it is split on spaces), e.g. "python3 tools/segref/segref.py"
to check the harness itself.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True
sys.path.insert(0, HERE)
import segref  # noqa: E402

FIELDS = ('customer_id', 'segment', 'change', 'at', 'seq', 'cause', 'message_id')


def project(stdout, who):
    out = []
    for i, line in enumerate(stdout.splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError:
            raise SystemExit('%s: stdout line %d is not JSON: %r' % (who, i + 1, line[:200]))
        rec = {k: d.get(k) for k in FIELDS}
        at = segref.parse_rfc3339(rec['at']) if isinstance(rec['at'], str) else None
        rec['at'] = segref.fmt_ms(at) if at is not None else rec['at']
        out.append(rec)
    return out


def rejected(stderr):
    return sorted({int(m.group(1)) for m in re.finditer(r'^line (\d+): ', stderr, re.M)})


def seeds(spec):
    res = []
    for part in spec.split(','):
        if '-' in part:
            a, b = part.split('-')
            res.extend(range(int(a), int(b) + 1))
        else:
            res.append(int(part))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--segmenter', required=True, help='command for the engine under test')
    ap.add_argument('--config', default=os.path.join(HERE, 'differential.toml'))
    ap.add_argument('--seeds', default='1-10')
    ap.add_argument('--customers', type=int, default=15)
    ap.add_argument('--events', type=int, default=300)
    ap.add_argument('--keep', help='directory to keep the inputs/outputs of failing seeds')
    a = ap.parse_args()

    for seed in seeds(a.seeds):
        gen = [sys.executable, os.path.join(HERE, 'gen_stream.py'), '--seed', str(seed),
               '--customers', str(a.customers), '--events', str(a.events)]
        events = subprocess.run(gen, capture_output=True, check=True).stdout
        until = subprocess.run(gen + ['--suggest-until'], capture_output=True, check=True,
                               text=True).stdout.strip()
        with tempfile.TemporaryDirectory() as td:
            ev_path = os.path.join(td, 'events.ndjson')
            with open(ev_path, 'wb') as f:
                f.write(events)
            common = ['replay', '--config', a.config, '--input', ev_path, '--until', until]
            ref = subprocess.run([sys.executable, os.path.join(HERE, 'segref.py')] + common[1:],
                                 capture_output=True, text=True)
            if ref.returncode != 0:
                raise SystemExit('segref failed (%d): %s' % (ref.returncode, ref.stderr))
            cmd = shlex.split(a.segmenter)
            if not cmd[-1].endswith('segref.py'):
                cmd = cmd + common
            else:
                cmd = cmd + common[1:]
            got = subprocess.run(cmd, capture_output=True, text=True)
            problems = []
            if got.returncode != 0:
                problems.append('engine exit code %d' % got.returncode)
            want_c, got_c = project(ref.stdout, 'segref'), project(got.stdout, 'engine')
            if want_c != got_c:
                k = next((i for i, (x, y) in enumerate(zip(want_c, got_c)) if x != y),
                         min(len(want_c), len(got_c)))
                problems.append('changes differ at #%d (segref %d changes, engine %d)\n'
                                '  segref: %s\n  engine: %s\n  segref before: %s'
                                % (k + 1, len(want_c), len(got_c),
                                   json.dumps(want_c[k]) if k < len(want_c) else '(none)',
                                   json.dumps(got_c[k]) if k < len(got_c) else '(none)',
                                   json.dumps(want_c[max(0, k - 3):k])))
            if rejected(ref.stderr) != rejected(got.stderr):
                problems.append('rejected lines differ: segref %s, engine %s'
                                % (rejected(ref.stderr), rejected(got.stderr)))
            if problems:
                print('seed %d: DIFFERENT (--until %s)' % (seed, until))
                for p in problems:
                    print('  ' + p)
                if a.keep:
                    d = os.path.join(a.keep, 'seed-%d' % seed)
                    os.makedirs(d, exist_ok=True)
                    for name, data in (('events.ndjson', events.decode()),
                                       ('segref.out', ref.stdout), ('segref.err', ref.stderr),
                                       ('engine.out', got.stdout), ('engine.err', got.stderr)):
                        with open(os.path.join(d, name), 'w') as f:
                            f.write(data)
                    print('  kept in %s' % d)
                return 1
            print('seed %d: same (%d changes, %d rejected lines)'
                  % (seed, len(want_c), len(rejected(ref.stderr))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
