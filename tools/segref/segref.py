#!/usr/bin/env python3
"""segref -- a deliberately naive reference implementation of `segmenter replay`.

Independent oracle for differential testing of the Rust engine. Python 3.11, stdlib only.
It follows /work/shared/SPEC.md (sections 2-5, 7) and docs/SEMANTICS.md; where both are silent
the choice made here is written down in tools/segref/README.md ("Decisions").

    python3 tools/segref/segref.py --config SEGMENTS.toml --input EVENTS.ndjson [--until TIME]

Design: correctness over speed.
  * every accepted event of a customer is kept in a plain list; a rule is evaluated at time `t`
    by re-scanning that list (matcher, window (t-W, t], ts <= t);
  * numbers are exact (fractions.Fraction, JSON floats read as Decimal), times are integer ms;
  * time-driven changes: every evaluation at t0 yields candidate instants > t0 -- every event
    time + every window length used by the rules, and, for every comparison whose two sides are
    linear in t (since()), the exact crossing milliseconds. Candidates are evaluated in increasing
    order; the first one whose memberships differ from the stored ones is the timer's due time.
    Between two consecutive candidates nothing can change (windows are fixed between
    event-time+W boundaries, and every comparison of linear functions changes truth only at its
    root), so this finds the first millisecond at which the membership differs.

Exit codes: 0 ok, 1 config/rule error, 2 usage error, 3 rule not supported by this oracle
(non-linear time dependence, e.g. since(a) * since(b)).
"""

import argparse
import datetime as _dt
import heapq
import json
import math
import re
import sys
import tomllib
from decimal import Decimal
from fractions import Fraction

# ----------------------------------------------------------------------------------------------
# time helpers
# ----------------------------------------------------------------------------------------------

MAX_MS = 253402300800000 - 1  # 9999-12-31T23:59:59.999Z
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_RFC3339 = re.compile(
    r'^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$')

UNIT_MS = {'ms': 1, 's': 1000, 'm': 60_000, 'h': 3_600_000, 'd': 86_400_000, 'w': 604_800_000}


def parse_rfc3339(s):
    """RFC 3339 string -> epoch ms (fraction truncated to ms); None if invalid/out of range."""
    m = _RFC3339.match(s)
    if not m:
        return None
    y, mo, d, hh, mi, ss = (int(m.group(i)) for i in range(1, 7))
    frac = m.group(7)
    off = m.group(8)
    if hh > 23 or mi > 59 or ss > 59:
        return None
    try:
        dt = _dt.datetime(y, mo, d, hh, mi, ss, tzinfo=_dt.timezone.utc)
    except ValueError:
        return None
    ms = (dt - _EPOCH) // _dt.timedelta(milliseconds=1)
    if frac:
        ms += int((frac[1:] + '000')[:3])
    if off not in ('Z', 'z'):
        oh, om = int(off[1:3]), int(off[4:6])
        if oh > 23 or om > 59:
            return None
        delta = (oh * 60 + om) * 60_000
        ms = ms - delta if off[0] == '+' else ms + delta
    if ms < 0 or ms > MAX_MS:
        return None
    return ms


def fmt_ms(ms):
    dt = _EPOCH + _dt.timedelta(milliseconds=ms)
    return dt.strftime('%Y-%m-%dT%H:%M:%S') + '.%03dZ' % (ms % 1000)


def parse_duration_str(s):
    m = re.fullmatch(r'(\d+)(ms|s|m|h|d|w)', s.strip())
    if not m:
        return None
    return int(m.group(1)) * UNIT_MS[m.group(2)]


# ----------------------------------------------------------------------------------------------
# extended linear numbers: value(t) = a*t + b (exact), or +/- infinity
# ----------------------------------------------------------------------------------------------

class Unsupported(Exception):
    pass


class Lin:
    __slots__ = ('a', 'b')

    def __init__(self, a, b):
        self.a = Fraction(a)
        self.b = Fraction(b)

    def at(self, t):
        return self.a * t + self.b

    def __repr__(self):
        return 'Lin(%s,%s)' % (self.a, self.b)


class Inf:
    __slots__ = ('s',)

    def __init__(self, s):
        self.s = s  # +1 or -1

    def __repr__(self):
        return '+inf' if self.s > 0 else '-inf'


def const(x):
    return Lin(0, x)


def ext_neg(x):
    if isinstance(x, Inf):
        return Inf(-x.s)
    return Lin(-x.a, -x.b)


def ext_add(x, y):
    """None stands for NaN (-> null)."""
    if isinstance(x, Inf) and isinstance(y, Inf):
        return x if x.s == y.s else None
    if isinstance(x, Inf):
        return x
    if isinstance(y, Inf):
        return y
    return Lin(x.a + y.a, x.b + y.b)


def ext_sub(x, y):
    return ext_add(x, ext_neg(y))


def _const_sign(x):
    if x.a != 0:
        raise Unsupported('infinity times a time-dependent value')
    return (x.b > 0) - (x.b < 0)


def ext_mul(x, y):
    if isinstance(x, Inf) or isinstance(y, Inf):
        sx = x.s if isinstance(x, Inf) else _const_sign(x)
        sy = y.s if isinstance(y, Inf) else _const_sign(y)
        s = sx * sy
        return None if s == 0 else Inf(s)
    if x.a != 0 and y.a != 0:
        raise Unsupported('product of two time-dependent values')
    return Lin(x.a * y.b + y.a * x.b, x.b * y.b)


def ext_div(x, y):
    if isinstance(y, Inf):
        if isinstance(x, Inf):
            return None
        return const(0)
    if y.a != 0:
        raise Unsupported('division by a time-dependent value')
    if y.b == 0:
        return None  # division by zero -> null
    if isinstance(x, Inf):
        return Inf(x.s * (1 if y.b > 0 else -1))
    return Lin(x.a / y.b, x.b / y.b)


# ----------------------------------------------------------------------------------------------
# rule language: tokenizer
# ----------------------------------------------------------------------------------------------

class RuleError(Exception):
    def __init__(self, line, col, msg):
        super().__init__(msg)
        self.line, self.col, self.msg = line, col, msg


KEYWORDS = {'and', 'or', 'not', 'in', 'is', 'null', 'true', 'false', 'never', 'any', 'where'}
FUNCTIONS = {'count', 'sum', 'avg', 'min', 'max', 'last', 'first', 'since', 'in_segment',
             'bucket'}
CMP_OPS = ('==', '!=', '<=', '>=', '<', '>')


class Tok:
    __slots__ = ('kind', 'val', 'text', 'line', 'col')

    def __init__(self, kind, val, text, line, col):
        self.kind, self.val, self.text, self.line, self.col = kind, val, text, line, col

    def __repr__(self):
        return 'Tok(%s,%r)' % (self.kind, self.text)


def tokenize(src):
    toks = []
    i, line, col = 0, 1, 1
    n = len(src)

    def adv(k):
        nonlocal i, line, col
        for _ in range(k):
            if src[i] == '\n':
                line += 1
                col = 1
            else:
                col += 1
            i += 1

    while i < n:
        c = src[i]
        if c in ' \t\r\n':
            adv(1)
            continue
        sl, sc = line, col
        if c in '"\'':
            q = c
            j = i + 1
            out = []
            while True:
                if j >= n or src[j] == '\n':
                    raise RuleError(sl, sc, 'unterminated string')
                ch = src[j]
                if ch == q:
                    j += 1
                    break
                if ch == '\\':
                    if j + 1 >= n:
                        raise RuleError(sl, sc, 'unterminated string')
                    e = src[j + 1]
                    simple = {'"': '"', "'": "'", '\\': '\\', 'n': '\n', 't': '\t', 'r': '\r',
                              '/': '/'}
                    if e in simple:
                        out.append(simple[e])
                        j += 2
                    elif e == 'u' and re.fullmatch(r'[0-9a-fA-F]{4}', src[j + 2:j + 6] or ''):
                        out.append(chr(int(src[j + 2:j + 6], 16)))
                        j += 6
                    else:
                        raise RuleError(sl, sc + (j - i), 'unknown escape \\%s in string' % e)
                    continue
                out.append(ch)
                j += 1
            toks.append(Tok('str', ''.join(out), src[i:j], sl, sc))
            adv(j - i)
            continue
        if c.isdigit() or (c == '.' and i + 1 < n and src[i + 1].isdigit()):
            m = re.compile(r'\d*(\.\d+)?').match(src, i)
            num = m.group(0)
            j = m.end()
            m2 = re.compile(r'[A-Za-z_][A-Za-z0-9_]*').match(src, j)
            if m2:
                unit = m2.group(0)
                if unit not in UNIT_MS:
                    raise RuleError(sl, sc, 'unknown duration unit "%s" (use ms, s, m, h, d or w)'
                                    % unit)
                if '.' in num or num == '':
                    raise RuleError(sl, sc, 'a duration must be a whole number followed by a unit')
                toks.append(Tok('dur', int(num) * UNIT_MS[unit], src[i:m2.end()], sl, sc))
                adv(m2.end() - i)
            else:
                toks.append(Tok('num', Fraction(num if not num.startswith('.') else '0' + num),
                                num, sl, sc))
                adv(j - i)
            continue
        if c.isalpha() or c == '_':
            m = re.compile(r'[A-Za-z_][A-Za-z0-9_]*').match(src, i)
            w = m.group(0)
            toks.append(Tok('ident', w, w, sl, sc))
            adv(len(w))
            continue
        two = src[i:i + 2]
        if two in ('==', '!=', '<=', '>='):
            toks.append(Tok('op', two, two, sl, sc))
            adv(2)
            continue
        if c in '<>+-*/()[],.':
            toks.append(Tok('op', c, c, sl, sc))
            adv(1)
            continue
        if c == '=':
            raise RuleError(sl, sc, 'unexpected "=" (use == to compare)')
        if c == '!':
            raise RuleError(sl, sc, 'unexpected "!" (use != or not)')
        raise RuleError(sl, sc, 'unexpected character %r' % c)
    toks.append(Tok('eof', None, 'end of rule', line, col))
    return toks


# ----------------------------------------------------------------------------------------------
# rule language: AST + recursive-descent parser
# ----------------------------------------------------------------------------------------------

class Node:
    """kind + fields; pos = (line, col)."""

    def __init__(self, kind, pos, **kw):
        self.kind = kind
        self.pos = pos
        self.__dict__.update(kw)

    def __repr__(self):
        d = {k: v for k, v in self.__dict__.items() if k not in ('kind', 'pos')}
        return '%s%r' % (self.kind, d)


class Matcher:
    def __init__(self, name, conds):
        self.name = name      # None means `any`
        self.conds = conds    # list of (path, op, value) ; op 'in' -> value is a list


class Parser:
    def __init__(self, src):
        self.toks = tokenize(src)
        self.i = 0

    # helpers
    def peek(self, k=0):
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self):
        t = self.toks[self.i]
        if t.kind != 'eof':
            self.i += 1
        return t

    def is_op(self, v, k=0):
        t = self.peek(k)
        return t.kind == 'op' and t.val == v

    def is_kw(self, v, k=0):
        t = self.peek(k)
        return t.kind == 'ident' and t.val == v

    def err(self, tok, msg):
        raise RuleError(tok.line, tok.col, msg)

    def expect_op(self, v, what=None):
        t = self.peek()
        if not (t.kind == 'op' and t.val == v):
            self.err(t, 'expected %s, found %s' % (what or '"%s"' % v, describe(t)))
        return self.next()

    # grammar
    def parse_rule(self):
        e = self.parse_or()
        t = self.peek()
        if t.kind != 'eof':
            self.err(t, 'unexpected %s after the end of the expression' % describe(t))
        return e

    def parse_or(self):
        left = self.parse_and()
        while self.is_kw('or'):
            t = self.next()
            right = self.parse_and()
            left = Node('or', (t.line, t.col), l=left, r=right)
        return left

    def parse_and(self):
        left = self.parse_not()
        while self.is_kw('and'):
            t = self.next()
            right = self.parse_not()
            left = Node('and', (t.line, t.col), l=left, r=right)
        return left

    def parse_not(self):
        if self.is_kw('not'):
            t = self.next()
            return Node('not', (t.line, t.col), x=self.parse_not())
        return self.parse_cmp()

    def parse_cmp(self):
        left = self.parse_add()
        t = self.peek()
        if t.kind == 'op' and t.val in CMP_OPS:
            self.next()
            right = self.parse_add()
            node = Node('cmp', (t.line, t.col), op=t.val, l=left, r=right)
        elif self.is_kw('in'):
            self.next()
            items = self.parse_list(self.parse_add)
            node = Node('in', (t.line, t.col), x=left, items=items)
        elif self.is_kw('is'):
            self.next()
            neg = False
            if self.is_kw('not'):
                self.next()
                neg = True
            if not self.is_kw('null'):
                self.err(self.peek(), 'expected null after "is%s", found %s'
                         % (' not' if neg else '', describe(self.peek())))
            self.next()
            node = Node('isnull', (t.line, t.col), x=left, neg=neg)
        else:
            return left
        t2 = self.peek()
        if (t2.kind == 'op' and t2.val in CMP_OPS) or self.is_kw('in') or self.is_kw('is'):
            self.err(t2, 'comparisons cannot be chained; join them with and')
        return node

    def parse_list(self, item):
        self.expect_op('[', '"[" to start a list')
        items = []
        if self.is_op(']'):
            self.next()
            return items
        while True:
            items.append(item())
            if self.is_op(','):
                self.next()
                continue
            self.expect_op(']', '"," or "]" in the list')
            return items

    def parse_add(self):
        left = self.parse_mul()
        while self.is_op('+') or self.is_op('-'):
            t = self.next()
            right = self.parse_mul()
            left = Node('arith', (t.line, t.col), op=t.val, l=left, r=right)
        return left

    def parse_mul(self):
        left = self.parse_unary()
        while self.is_op('*') or self.is_op('/'):
            t = self.next()
            right = self.parse_unary()
            left = Node('arith', (t.line, t.col), op=t.val, l=left, r=right)
        return left

    def parse_unary(self):
        if self.is_op('-'):
            t = self.next()
            return Node('neg', (t.line, t.col), x=self.parse_unary())
        return self.parse_primary()

    def parse_primary(self):
        t = self.peek()
        pos = (t.line, t.col)
        if t.kind == 'num':
            self.next()
            return Node('lit', pos, v=('num', const(t.val)), ty='num')
        if t.kind == 'dur':
            self.next()
            return Node('lit', pos, v=('dur', const(t.val)), ty='dur')
        if t.kind == 'str':
            self.next()
            return Node('lit', pos, v=('str', t.val), ty='str')
        if self.is_op('('):
            self.next()
            e = self.parse_or()
            self.expect_op(')', '")"')
            return e
        if t.kind == 'ident':
            w = t.val
            if w in ('true', 'false'):
                self.next()
                return Node('lit', pos, v=('bool', w == 'true'), ty='bool')
            if w == 'null':
                self.next()
                return Node('lit', pos, v=None, ty='null')
            if w == 'never':
                self.next()
                return Node('lit', pos, v=('time', Inf(-1)), ty='time')
            if w == 'trait':
                self.next()
                self.expect_op('.', '"." after trait (trait.NAME)')
                path = [self.parse_name('a trait name after "trait."')]
                while self.is_op('.'):
                    self.next()
                    path.append(self.parse_name('a name after "."'))
                return Node('trait', pos, path=path)
            if w == 'any':
                self.err(t, '"any" can only be used as the event of count/sum/avg/min/max/'
                            'last/first')
            if w in FUNCTIONS:
                self.next()
                if not self.is_op('('):
                    self.err(self.peek(), 'expected "(" after %s' % w)
                return self.parse_call(w, pos)
            if w in KEYWORDS:
                self.err(t, 'unexpected "%s"' % w)
            if self.is_op('(', 1):
                self.err(t, 'unknown function "%s"' % w)
            self.err(t, 'unknown name "%s" (traits are written trait.%s)' % (w, w))
        self.err(t, 'expected a value, found %s' % describe(t))

    def parse_name(self, what):
        t = self.peek()
        if t.kind == 'ident':
            self.next()
            return t.val
        if t.kind == 'str':
            self.next()
            return t.val
        self.err(t, 'expected %s, found %s' % (what, describe(t)))

    def parse_call(self, fn, pos):
        self.expect_op('(')
        if fn == 'count':
            m = self.parse_matcher()
            w = None
            if self.is_op(','):
                self.next()
                w = self.parse_window()
            self.expect_op(')', '")" or "," and a window')
            return Node('agg', pos, fn=fn, m=m, prop=None, w=w)
        if fn in ('sum', 'avg', 'min', 'max'):
            m = self.parse_matcher()
            self.expect_op(',', '"," and a property name (%s(EVENT, "prop"))' % fn)
            prop = self.parse_prop(for_agg=True)
            w = None
            if self.is_op(','):
                self.next()
                w = self.parse_window()
            self.expect_op(')', '")" or "," and a window')
            return Node('agg', pos, fn=fn, m=m, prop=prop, w=w)
        if fn in ('last', 'first'):
            m = self.parse_matcher()
            self.expect_op(')', '")"')
            return Node('lastfirst', pos, fn=fn, m=m)
        if fn == 'since':
            x = self.parse_or()
            self.expect_op(')', '")"')
            return Node('since', pos, x=x)
        if fn == 'in_segment':
            t = self.peek()
            if t.kind != 'str':
                self.err(t, 'in_segment needs a segment id in quotes')
            self.next()
            self.expect_op(')', '")"')
            return Node('in_segment', pos, seg=t.val, argpos=(t.line, t.col))
        if fn == 'bucket':
            t = self.peek()
            if t.kind != 'num' or t.val.denominator != 1 or t.val < 1:
                self.err(t, 'bucket needs a whole number of buckets, at least 1')
            self.next()
            self.expect_op(')', '")"')
            return Node('bucket', pos, n=int(t.val))
        raise AssertionError(fn)

    def parse_window(self):
        t = self.peek()
        if t.kind != 'dur':
            self.err(t, 'expected a window duration such as 30d, found %s' % describe(t))
        if t.val <= 0:
            self.err(t, 'a window must be longer than zero')
        self.next()
        return t.val

    def parse_matcher(self):
        t = self.peek()
        if t.kind == 'str':
            self.next()
            name = t.val
        elif self.is_kw('any'):
            self.next()
            name = None
        else:
            self.err(t, 'expected an event name in quotes or any, found %s' % describe(t))
        conds = []
        if self.is_kw('where'):
            self.next()
            conds.append(self.parse_cond())
            while self.is_kw('and'):
                self.next()
                conds.append(self.parse_cond())
        return Matcher(name, conds)

    def parse_prop(self, for_agg=False):
        """a quoted property is a literal key (for where and for sum/avg/min/max); an unquoted
        dotted path descends into nested objects."""
        t = self.peek()
        if t.kind == 'str':
            self.next()
            return [t.val]
        if t.kind == 'ident' and t.val not in KEYWORDS:
            self.next()
            path = [t.val]
            while self.is_op('.'):
                self.next()
                n = self.peek()
                if n.kind != 'ident':
                    self.err(n, 'expected a property name after "."')
                self.next()
                path.append(n.val)
            return path
        self.err(t, 'expected a property name, found %s' % describe(t))

    def parse_cond(self):
        path = self.parse_prop()
        t = self.peek()
        if t.kind == 'op' and t.val in CMP_OPS:
            self.next()
            return (path, t.val, self.parse_where_value())
        if self.is_kw('in'):
            self.next()
            return (path, 'in', self.parse_list(self.parse_where_value))
        self.err(t, 'expected a comparison (== != < <= > >= or in) after the property, found %s'
                 % describe(t))

    def parse_where_value(self):
        t = self.peek()
        if t.kind == 'str':
            self.next()
            return ('str', t.val)
        if t.kind == 'num':
            self.next()
            return ('num', const(t.val))
        if self.is_op('-') and self.peek(1).kind == 'num':
            self.next()
            n = self.next()
            return ('num', const(-n.val))
        if self.is_kw('true') or self.is_kw('false'):
            self.next()
            return ('bool', t.val == 'true')
        if self.is_kw('null'):
            self.next()
            return None
        self.err(t, 'expected a string, number, true, false or null, found %s' % describe(t))


def describe(t):
    if t.kind == 'eof':
        return 'the end of the rule'
    return '"%s"' % t.text


# ----------------------------------------------------------------------------------------------
# static type check (load time)
# ----------------------------------------------------------------------------------------------

NUMERIC = ('num', 'dur', 'time')

ADD = {('num', 'num'): 'num', ('dur', 'dur'): 'dur', ('time', 'dur'): 'time',
       ('dur', 'time'): 'time'}
SUB = {('num', 'num'): 'num', ('dur', 'dur'): 'dur', ('time', 'dur'): 'time',
       ('time', 'time'): 'dur'}
MUL = {('num', 'num'): 'num', ('dur', 'num'): 'dur', ('num', 'dur'): 'dur'}
DIV = {('num', 'num'): 'num', ('dur', 'num'): 'dur', ('dur', 'dur'): 'num'}
ARITH = {'+': ADD, '-': SUB, '*': MUL, '/': DIV}

TYPE_WORDS = {'num': 'a number', 'dur': 'a duration', 'time': 'a time', 'str': 'a string',
              'bool': 'true/false', 'null': 'null', 'dyn': 'a trait/property'}


def typecheck(node, segids, deps, windows, limits):
    """returns (type, time_dependent). Raises RuleError. Records in_segment deps, windows, and
    the oracle's own limits (non-linear time dependence) in `limits`."""
    k = node.kind
    line, col = node.pos

    def err(msg, pos=None):
        p = pos or node.pos
        raise RuleError(p[0], p[1], msg)

    def tc(n):
        return typecheck(n, segids, deps, windows, limits)

    if k == 'lit':
        return node.ty, False
    if k == 'trait':
        return 'dyn', False
    if k in ('and', 'or'):
        for side in (node.l, node.r):
            ty, _ = tc(side)
            if ty not in ('bool', 'dyn', 'null'):
                err('"%s" needs true/false on both sides, found %s' % (k, TYPE_WORDS[ty]),
                    side.pos)
        return 'bool', False
    if k == 'not':
        ty, _ = tc(node.x)
        if ty not in ('bool', 'dyn', 'null'):
            err('"not" needs true/false, found %s' % TYPE_WORDS[ty])
        return 'bool', False
    if k == 'cmp':
        lt, _ = tc(node.l)
        rt, _ = tc(node.r)
        check_compat(node.op, lt, rt, node.pos)
        return 'bool', False
    if k == 'in':
        xt, _ = tc(node.x)
        for it in node.items:
            ity, _ = tc(it)
            check_compat('==', xt, ity, it.pos)
        return 'bool', False
    if k == 'isnull':
        tc(node.x)
        return 'bool', False
    if k == 'neg':
        ty, td = tc(node.x)
        if ty not in ('num', 'dur', 'dyn', 'null'):
            err('cannot negate %s' % TYPE_WORDS[ty])
        return ty, td
    if k == 'arith':
        lt, ltd = tc(node.l)
        rt, rtd = tc(node.r)
        for ty, side in ((lt, node.l), (rt, node.r)):
            if ty in ('str', 'bool'):
                err('cannot use %s in arithmetic ("%s")' % (TYPE_WORDS[ty], node.op), side.pos)
        if node.op == '*' and ltd and rtd:
            limits.append((line, col, 'product of two time-dependent values (non-linear)'))
        if node.op == '/' and rtd:
            limits.append((line, col, 'division by a time-dependent value (non-linear)'))
        td = ltd or rtd
        if 'null' in (lt, rt):
            return 'null', td
        if 'dyn' in (lt, rt):
            return 'dyn', td
        res = ARITH[node.op].get((lt, rt))
        if res is None:
            err('cannot compute %s %s %s' % (TYPE_WORDS[lt], node.op, TYPE_WORDS[rt]))
        return res, td
    if k == 'agg':
        if node.w is not None:
            windows.add(node.w)
        return 'num', False
    if k == 'lastfirst':
        return 'time', False
    if k == 'since':
        ty, _ = tc(node.x)
        if ty not in ('time', 'null'):
            err('since() needs a time (such as last("Event")), found %s' % TYPE_WORDS[ty],
                node.x.pos)
        return 'dur', True
    if k == 'in_segment':
        if node.seg not in segids:
            err('unknown segment "%s"' % node.seg, node.argpos)
        deps.append((node.seg, node.argpos))
        return 'bool', False
    if k == 'bucket':
        return 'num', False
    raise AssertionError(k)


def check_compat(op, lt, rt, pos):
    if lt in ('dyn', 'null') or rt in ('dyn', 'null'):
        return
    if lt != rt:
        raise RuleError(pos[0], pos[1], 'cannot compare %s with %s' % (TYPE_WORDS[lt],
                                                                        TYPE_WORDS[rt]))
    if lt == 'bool' and op not in ('==', '!='):
        raise RuleError(pos[0], pos[1], 'true/false can only be compared with == or !=')


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------

class ConfigError(Exception):
    pass


class Segment:
    def __init__(self, sid, rule, ast, index):
        self.id, self.rule, self.ast, self.index = sid, rule, ast, index


class Config:
    def __init__(self):
        self.segments = []      # definition order
        self.topo = []          # evaluation order
        self.windows = []       # all window lengths (ms)
        self.dedup_window = 24 * 3_600_000
        self.max_event_bytes = 65536
        self.limits = []        # (segment, line, col, what) this oracle cannot handle


def load_config(path):
    try:
        with open(path, 'rb') as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError('%s: no such file' % path)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError('%s: invalid TOML: %s' % (path, e))
    cfg = Config()
    inp = doc.get('input', {})
    if not isinstance(inp, dict):
        raise ConfigError('[input] must be a table')
    if 'dedup_window' in inp:
        v = inp['dedup_window']
        d = parse_duration_str(v) if isinstance(v, str) else None
        if d is None:
            raise ConfigError('input.dedup_window: expected a duration such as "24h", found %r'
                              % (v,))
        cfg.dedup_window = d
    if 'max_event_bytes' in inp:
        v = inp['max_event_bytes']
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError('input.max_event_bytes: expected a positive integer, found %r'
                              % (v,))
        cfg.max_event_bytes = v
    segs = doc.get('segment', [])
    if not isinstance(segs, list):
        raise ConfigError('segment must be an array of tables ([[segment]])')
    raw = []
    seen = set()
    for i, s in enumerate(segs):
        if not isinstance(s, dict):
            raise ConfigError('segment #%d: not a table' % (i + 1))
        sid = s.get('id')
        if not isinstance(sid, str) or not re.fullmatch(r'[a-z0-9_]+', sid):
            raise ConfigError('segment #%d: id must match [a-z0-9_]+, found %r' % (i + 1, sid))
        if sid in seen:
            raise ConfigError('segment "%s": duplicate id' % sid)
        seen.add(sid)
        rule = s.get('rule')
        if not isinstance(rule, str):
            raise ConfigError('segment "%s": missing rule' % sid)
        if 'description' in s and not isinstance(s['description'], str):
            raise ConfigError('segment "%s": description must be a string' % sid)
        raw.append((sid, rule))
    windows = set()
    deps = {}
    for i, (sid, rule) in enumerate(raw):
        try:
            ast = Parser(rule).parse_rule()
            d = []
            lim = []
            ty, _ = typecheck(ast, seen, d, windows, lim)
            if ty not in ('bool', 'dyn', 'null'):
                raise RuleError(1, 1, 'a rule must be a condition (true/false), this one is %s'
                                % TYPE_WORDS[ty])
        except RuleError as e:
            raise ConfigError('segment "%s": rule line %d, column %d: %s'
                              % (sid, e.line, e.col, e.msg))
        deps[sid] = d
        for (l, c, what) in lim:
            cfg.limits.append((sid, l, c, what))
        cfg.segments.append(Segment(sid, rule, ast, i))
    # cycles + topological order (dependencies first; ties by definition order)
    state = {}
    order = []
    byid = {s.id: s for s in cfg.segments}

    def visit(sid, stack):
        st = state.get(sid)
        if st == 'done':
            return
        if st == 'active':
            cyc = stack[stack.index(sid):] + [sid]
            raise ConfigError('segment "%s": in_segment cycle: %s' % (sid, ' -> '.join(cyc)))
        state[sid] = 'active'
        for (dep, pos) in deps[sid]:
            visit(dep, stack + [sid])
        state[sid] = 'done'
        order.append(byid[sid])

    for s in cfg.segments:
        visit(s.id, [])
    cfg.topo = order
    cfg.windows = sorted(windows)
    return cfg


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

def fnv1a64(s):
    h = 0xcbf29ce484222325
    for b in s.encode('utf-8'):
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def json_value(x):
    """JSON (as decoded with parse_float=Decimal) -> typed runtime value."""
    if x is None:
        return None
    if isinstance(x, bool):
        return ('bool', x)
    if isinstance(x, (int, Decimal)):
        return ('num', const(Fraction(x)))
    if isinstance(x, str):
        return ('str', x)
    return ('json', x)


def descend(obj, path):
    cur = obj
    for p in path:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        else:
            return None
    return cur


def truthy(v):
    return v is not None and v[0] == 'bool' and v[1] is True


def add_roots(r, roots):
    f = math.floor(r)
    c = math.ceil(r)
    roots.update((f, f + 1, c, c + 1))


def compare(op, x, y, t, roots):
    if x is None or y is None:
        return False
    tx, px = x
    ty, py = y
    if tx != ty:
        return False
    if tx in NUMERIC:
        if isinstance(px, Inf) or isinstance(py, Inf):
            kx = (px.s, 0) if isinstance(px, Inf) else (0, px.at(t))
            ky = (py.s, 0) if isinstance(py, Inf) else (0, py.at(t))
            return apply_op(op, kx, ky)
        a = px.a - py.a
        b = px.b - py.b
        if a != 0:
            add_roots(-b / a, roots)
        return apply_op(op, a * t + b, 0)
    if tx == 'str':
        return apply_op(op, px, py)
    if tx == 'bool':
        if op in ('==', '!='):
            return apply_op(op, px, py)
        return False
    return False  # arrays/objects


def apply_op(op, a, b):
    if op == '==':
        return a == b
    if op == '!=':
        return a != b
    if op == '<':
        return a < b
    if op == '<=':
        return a <= b
    if op == '>':
        return a > b
    if op == '>=':
        return a >= b
    raise AssertionError(op)


def arith(op, x, y):
    if x is None or y is None:
        return None
    tx, px = x
    ty, py = y
    res = ARITH[op].get((tx, ty))
    if res is None:
        return None  # runtime type mismatch (dynamic traits/properties)
    if op == '+':
        v = ext_add(px, py)
    elif op == '-':
        v = ext_sub(px, py)
    elif op == '*':
        v = ext_mul(px, py)
    else:
        v = ext_div(px, py)
    return None if v is None else (res, v)


def matches(ev, m):
    if ev['name'] is None:
        return False  # identify is not an activity
    if m.name is not None and ev['name'] != m.name:
        return False
    for (path, op, val) in m.conds:
        pv = json_value(descend(ev['props'], path))
        dummy = set()
        if op == 'in':
            if not any(compare('==', pv, it, 0, dummy) for it in val):
                return False
        elif not compare(op, pv, val, 0, dummy):
            return False
    return True


def numeric_prop(ev, path):
    v = descend(ev['props'], path)
    if isinstance(v, bool) or not isinstance(v, (int, Decimal)):
        return None
    return Fraction(v)


class Ctx:
    def __init__(self, cust, t, values, roots):
        self.c, self.t, self.values, self.roots = cust, t, values, roots


def ev(node, cx):
    k = node.kind
    t = cx.t
    if k == 'lit':
        return node.v
    if k == 'trait':
        best = None
        for (ts, order, traits) in cx.c.identifies:
            if node.path[0] in traits:
                key = (ts, order)
                if best is None or key > best[0]:
                    best = (key, traits[node.path[0]])
        if best is None:
            return None
        return json_value(descend(best[1], node.path[1:]) if len(node.path) > 1 else best[1])
    if k == 'and':
        a = truthy(ev(node.l, cx))   # no short-circuit: both sides contribute candidates
        b = truthy(ev(node.r, cx))
        return ('bool', a and b)
    if k == 'or':
        a = truthy(ev(node.l, cx))
        b = truthy(ev(node.r, cx))
        return ('bool', a or b)
    if k == 'not':
        return ('bool', not truthy(ev(node.x, cx)))
    if k == 'cmp':
        return ('bool', compare(node.op, ev(node.l, cx), ev(node.r, cx), t, cx.roots))
    if k == 'in':
        x = ev(node.x, cx)
        hits = [compare('==', x, ev(it, cx), t, cx.roots) for it in node.items]
        return ('bool', any(hits))
    if k == 'isnull':
        x = ev(node.x, cx)
        return ('bool', (x is None) != node.neg)
    if k == 'neg':
        x = ev(node.x, cx)
        if x is None or x[0] not in ('num', 'dur'):
            return None
        return (x[0], ext_neg(x[1]))
    if k == 'arith':
        return arith(node.op, ev(node.l, cx), ev(node.r, cx))
    if k == 'agg':
        evs = [e for e in cx.c.events
               if e['ts'] <= t and (node.w is None or t - node.w < e['ts'])
               and matches(e, node.m)]
        if node.fn == 'count':
            return ('num', const(len(evs)))
        vals = [v for v in (numeric_prop(e, node.prop) for e in evs) if v is not None]
        if node.fn == 'sum':
            return ('num', const(sum(vals, Fraction(0))))
        if not vals:
            return None
        if node.fn == 'avg':
            return ('num', const(sum(vals, Fraction(0)) / len(vals)))
        if node.fn == 'min':
            return ('num', const(min(vals)))
        return ('num', const(max(vals)))
    if k == 'lastfirst':
        ts = [e['ts'] for e in cx.c.events if e['ts'] <= t and matches(e, node.m)]
        if not ts:
            return ('time', Inf(-1))
        return ('time', const(max(ts) if node.fn == 'last' else min(ts)))
    if k == 'since':
        x = ev(node.x, cx)
        if x is None:
            return None
        v = ext_sub(Lin(1, 0), x[1])   # since(T) at t = t - T
        return None if v is None else ('dur', v)
    if k == 'in_segment':
        return ('bool', cx.values[node.seg])
    if k == 'bucket':
        return ('num', const(fnv1a64(cx.c.id) % node.n))
    raise AssertionError(k)


# ----------------------------------------------------------------------------------------------
# input decoding
# ----------------------------------------------------------------------------------------------

class Reject(Exception):
    pass


def _no_constants(name):
    raise ValueError('not JSON: %s' % name)


def decode_line(raw, max_bytes):
    if len(raw) > max_bytes:
        raise Reject('too large (%d bytes > %d)' % (len(raw), max_bytes))
    try:
        text = raw.decode('utf-8')
        obj = json.loads(text, parse_float=Decimal, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Reject('not JSON')
    if not isinstance(obj, dict):
        raise Reject('not a JSON object')
    if 'type' not in obj:
        raise Reject('missing type')
    typ = obj['type']
    if typ not in ('track', 'page', 'screen', 'identify'):
        raise Reject('unknown type %s' % json.dumps(typ, ensure_ascii=False, default=str))
    cid = None
    for key in ('userId', 'anonymousId'):
        v = obj.get(key)
        if isinstance(v, str) and v != '':
            cid = v
            break
        if isinstance(v, int) and not isinstance(v, bool):
            cid = str(v)
            break
    if cid is None:
        raise Reject('no customer id')
    if 'timestamp' not in obj:
        raise Reject('missing timestamp')
    tsv = obj['timestamp']
    if isinstance(tsv, str):
        ts = parse_rfc3339(tsv)
        if ts is None:
            raise Reject('bad timestamp %s' % json.dumps(tsv, ensure_ascii=False))
    elif isinstance(tsv, (int, Decimal)) and not isinstance(tsv, bool):
        ts = math.floor(tsv)
        if ts < 0 or ts > MAX_MS:
            raise Reject('bad timestamp %s (out of range)' % tsv)
    else:
        raise Reject('bad timestamp (not a string or number)')
    if typ == 'track':
        name = obj.get('event')
        if not isinstance(name, str) or name == '':
            raise Reject('track without an event name')
    elif typ == 'identify':
        name = None
    else:
        name = typ
    props = obj.get('properties', {})
    if 'properties' in obj and not isinstance(props, dict):
        raise Reject('properties is not an object')
    traits = obj.get('traits', {})
    if 'traits' in obj and not isinstance(traits, dict):
        raise Reject('traits is not an object')
    mid = obj.get('messageId')
    if not isinstance(mid, str):
        mid = None
    return {'cid': cid, 'type': typ, 'name': name, 'ts': ts, 'mid': mid, 'props': props,
            'traits': traits if typ == 'identify' else None}


# ----------------------------------------------------------------------------------------------
# the engine (event clock)
# ----------------------------------------------------------------------------------------------

class Customer:
    def __init__(self, cid, segs):
        self.id = cid
        self.events = []          # accepted activity events (dicts), input order
        self.identifies = []      # (ts, input order, traits)
        self.msgids = {}          # messageId -> event time of the applied event with that id
        self.member = {s.id: False for s in segs}
        self.seq = {s.id: 0 for s in segs}
        self.last_eval = None
        self.heap = []            # candidate instants > last_eval not yet examined
        self.found = None         # (t, values, roots) of the earliest change found


class Engine:
    def __init__(self, cfg, out):
        self.cfg = cfg
        self.out = out
        self.now = None
        self.customers = {}
        self.order = 0
        self.n_changes = 0

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, c, t):
        values = {}
        roots = set()
        cx = Ctx(c, t, values, roots)
        for s in self.cfg.topo:
            values[s.id] = truthy(ev(s.ast, cx))
        return values, roots

    def reset_search(self, c, t0, roots):
        c.last_eval = t0
        cands = {r for r in roots if r > t0}
        for e in c.events:
            for w in self.cfg.windows:
                if e['ts'] + w > t0:
                    cands.add(e['ts'] + w)
        c.heap = sorted(cands)   # a sorted list is a valid heap
        c.found = None

    def next_change(self, c, limit):
        """earliest t in (c.last_eval, limit] at which some membership differs, else None."""
        if c.found is not None:
            return c.found[0] if c.found[0] <= limit else None
        while c.heap and c.heap[0] <= limit:
            t = heapq.heappop(c.heap)
            while c.heap and c.heap[0] == t:
                heapq.heappop(c.heap)
            values, roots = self.evaluate(c, t)
            if values != c.member:
                c.found = (t, values, roots)
                return t
            for r in roots:
                if r > t:
                    heapq.heappush(c.heap, r)
        return None

    def commit(self, c, t, values, roots, cause, mid):
        for s in self.cfg.segments:  # definition order
            if values[s.id] != c.member[s.id]:
                c.seq[s.id] += 1
                rec = {'customer_id': c.id, 'segment': s.id,
                       'change': 'entered' if values[s.id] else 'exited',
                       'at': fmt_ms(t), 'seq': c.seq[s.id], 'cause': cause}
                if cause == 'event' and mid is not None:
                    rec['message_id'] = mid
                self.out.write(json.dumps(rec, ensure_ascii=False, separators=(',', ':')) + '\n')
                self.n_changes += 1
        c.member = values
        self.reset_search(c, t, roots)

    def fire_timers(self, limit):
        while True:
            best = None
            for cid, c in self.customers.items():
                t = self.next_change(c, limit)
                if t is not None and (best is None or (t, cid) < best):
                    best = (t, cid)
            if best is None:
                return
            c = self.customers[best[1]]
            t, values, roots = c.found
            self.commit(c, t, values, roots, 'timer', None)

    # -- input ---------------------------------------------------------------------------------
    def accept(self, e):
        """returns 'applied' or 'duplicate'."""
        new_now = e['ts'] if self.now is None else max(self.now, e['ts'])
        self.fire_timers(new_now)
        self.now = new_now
        c = self.customers.get(e['cid'])
        if c is not None and e['mid'] is not None and e['mid'] in c.msgids:
            first_ts = c.msgids[e['mid']]
            if first_ts > self.now - self.cfg.dedup_window:
                return 'duplicate'
        if c is None:
            c = Customer(e['cid'], self.cfg.segments)
            self.customers[e['cid']] = c
        self.order += 1
        if e['mid'] is not None:
            c.msgids[e['mid']] = self.now  # the clock when first applied (SEMANTICS.md)
        if e['type'] == 'identify':
            c.identifies.append((e['ts'], self.order, e['traits']))
        else:
            c.events.append(e)
        values, roots = self.evaluate(c, self.now)
        self.commit(c, self.now, values, roots, 'event', e['mid'])
        return 'applied'

    def until(self, t):
        if self.now is None:
            self.now = t
        else:
            self.now = max(self.now, t)
        self.fire_timers(self.now)


def read_lines(f):
    """yields (line number, raw bytes without the line terminator); whitespace-only lines are
    yielded too (the caller skips them)."""
    n = 0
    for raw in f:
        n += 1
        if raw.endswith(b'\n'):
            raw = raw[:-1]
            if raw.endswith(b'\r'):
                raw = raw[:-1]
        yield n, raw


def parse_time_arg(s):
    if re.fullmatch(r'\d+', s):
        v = int(s)
        return v if v <= MAX_MS else None
    return parse_rfc3339(s)


def main(argv=None):
    ap = argparse.ArgumentParser(prog='segref', description='naive reference `segmenter replay`')
    ap.add_argument('--config', required=True)
    ap.add_argument('--input', required=True, help='NDJSON file, or - for stdin')
    ap.add_argument('--until', help='RFC 3339 time or epoch ms: finally advance the clock')
    args = ap.parse_args(argv)

    until = None
    if args.until is not None:
        until = parse_time_arg(args.until)
        if until is None:
            print('segref: --until: not an RFC 3339 time or epoch milliseconds: %s' % args.until,
                  file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print('segref: config error: %s' % e, file=sys.stderr)
        return 1
    if cfg.limits:
        for (sid, l, c, what) in cfg.limits:
            print('segref: segment "%s": rule line %d, column %d: not supported by the reference '
                  'implementation: %s' % (sid, l, c, what), file=sys.stderr)
        return 3

    out = sys.stdout
    eng = Engine(cfg, out)
    stats = {'lines': 0, 'blank': 0, 'applied': 0, 'duplicate': 0, 'rejected': 0}
    try:
        f = sys.stdin.buffer if args.input == '-' else open(args.input, 'rb')
    except OSError as e:
        print('segref: cannot open input: %s' % e, file=sys.stderr)
        return 2
    try:
        with f:
            for n, raw in read_lines(f):
                stats['lines'] += 1
                if len(raw) <= cfg.max_event_bytes and raw.strip(b' \t\r\n') == b'':
                    stats['blank'] += 1
                    continue
                try:
                    e = decode_line(raw, cfg.max_event_bytes)
                except Reject as r:
                    stats['rejected'] += 1
                    print('line %d: %s' % (n, r), file=sys.stderr)
                    continue
                stats[eng.accept(e)] += 1
        if until is not None:
            eng.until(until)
    except Unsupported as u:
        print('segref: not supported by the reference implementation: %s' % u, file=sys.stderr)
        return 3
    out.flush()
    print('segref: %d lines: %d applied, %d duplicates, %d rejected, %d blank; %d changes; '
          'clock %s' % (stats['lines'], stats['applied'], stats['duplicate'], stats['rejected'],
                        stats['blank'], eng.n_changes,
                        fmt_ms(eng.now) if eng.now is not None else 'unset'), file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
