//! Evaluating compiled rules against one customer's state at a logical time, and finding the
//! next instant at which any membership could change without a new event.
//!
//! Numeric values are tracked as linear functions of time (`v + k·dt`): `since(T)` grows by one
//! millisecond per millisecond, everything else is constant between "breakpoints" (an event
//! leaving a window). A comparison whose two sides have different slopes flips at a computable
//! millisecond; the search for it re-evaluates the comparison exactly at candidate instants, so
//! floating-point rounding never makes a timer early or late.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::features::{fnv1a_64, op_holds, CustomerState, WindowStats};
use crate::model::Millis;
use crate::rules::ast::{AggFunc, BinOp};
use crate::rules::program::{CExpr, Const, Program, Source};
use serde_json::Value;

/// `v + k·(t' - t)` around the evaluation time `t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Lin {
    pub(super) v: f64,
    pub(super) k: f64,
}

impl Lin {
    fn constant(v: f64) -> Lin {
        Lin { v, k: 0.0 }
    }

    fn normalized(v: f64, k: f64) -> Option<Lin> {
        if v.is_nan() || k.is_nan() {
            return None;
        }
        let k = if v.is_finite() { k } else { 0.0 };
        Some(Lin { v, k })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Val<'a> {
    Null,
    Bool(bool),
    Num(Lin),
    Dur(Lin),
    Time(Lin),
    Str(&'a str),
}

impl Val<'_> {
    fn truthy(self) -> bool {
        matches!(self, Val::Bool(true))
    }

    fn lin(self) -> Option<Lin> {
        match self {
            Val::Num(lin) | Val::Dur(lin) | Val::Time(lin) => Some(lin),
            _ => None,
        }
    }
}

/// The outcome of evaluating every segment for one customer at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Membership per segment, in definition order.
    pub members: Vec<bool>,
    /// Per segment, the earliest later instant at which its value might change absent new
    /// events (`None`: never). A candidate, not a promise: the value may turn out the same.
    pub candidates: Vec<Option<Millis>>,
    /// Which segments were evaluated (the others kept their stored membership).
    pub evaluated: Vec<bool>,
}

/// A comparison whose sides move at different rates; it flips near `estimate`.
struct PendingFlip<'p> {
    lhs: &'p CExpr,
    rhs: &'p CExpr,
    ordering: Option<Ordering>,
    estimate: f64,
}

pub(super) struct Ctx<'p, 'm> {
    program: &'p Program,
    state: &'p CustomerState,
    t: Millis,
    bucket_hash: u64,
    /// Memberships `in_segment` reads: owned while `evaluate_dirty` updates them, borrowed by
    /// the look-ahead walks and probes.
    members: Cow<'m, [bool]>,
    record: bool,
    breakpoint: Option<Millis>,
    flips: Vec<PendingFlip<'p>>,
}

/// Evaluates every segment for a customer at `t`.
pub fn evaluate(
    program: &Program,
    state: &CustomerState,
    customer_id: &str,
    t: Millis,
) -> Evaluation {
    evaluate_dirty(
        program,
        state,
        customer_id,
        t,
        vec![true; program.segments.len()],
    )
}

/// Evaluates the segments marked in `dirty` at `t`; the others keep their stored membership
/// (valid because nothing they read changed and no timer of theirs is due). A segment whose value
/// changes makes the segments that name it in `in_segment` dirty too. Candidates are `None` for
/// segments not evaluated.
pub fn evaluate_dirty(
    program: &Program,
    state: &CustomerState,
    customer_id: &str,
    t: Millis,
    mut dirty: Vec<bool>,
) -> Evaluation {
    let members: Vec<bool> = state.memberships.iter().map(|m| m.member).collect();
    let mut ctx = Ctx::new(
        program,
        state,
        fnv1a_64(customer_id.as_bytes()),
        t,
        Cow::Owned(members),
    );
    let mut candidates = vec![None; program.segments.len()];
    for &idx in &program.eval_order {
        if !dirty[idx] {
            continue;
        }
        let (value, candidate) = ctx.segment(idx);
        if value != ctx.members[idx] {
            for &dependent in &program.segments[idx].dependents {
                dirty[dependent] = true;
            }
        }
        ctx.members.to_mut()[idx] = value;
        candidates[idx] = candidate;
    }
    Evaluation {
        members: ctx.members.into_owned(),
        candidates,
        evaluated: dirty,
    }
}

/// Looks for the next change of each evaluated segment, walking its own candidate instants (at
/// most `max_steps`) only while they are earlier than the best answer so far: before that answer
/// no membership changes, so `in_segment` reads the current `members`. Returns, per evaluated
/// segment, a lower bound of its next change (the change found, or the first instant not yet
/// examined; `None`: no change ever without new events); `None` for segments not evaluated.
/// `best` starts as the earliest pending check of the segments not evaluated.
pub fn next_change(
    program: &Program,
    state: &CustomerState,
    customer_id: &str,
    evaluation: &Evaluation,
    mut best: Option<Millis>,
    max_steps: usize,
) -> Vec<Option<Millis>> {
    let bucket_hash = fnv1a_64(customer_id.as_bytes());
    let before_best = |at: Millis, best: Option<Millis>| best.is_none_or(|b| at < b);
    let mut checks = vec![None; evaluation.candidates.len()];
    for &idx in &program.eval_order {
        if !evaluation.evaluated[idx] {
            continue;
        }
        let mut candidate = evaluation.candidates[idx];
        let mut steps = 0;
        while let Some(at) = candidate {
            if !before_best(at, best) {
                break;
            }
            if steps == max_steps {
                best = Some(at);
                break;
            }
            steps += 1;
            let mut ctx = Ctx::new(
                program,
                state,
                bucket_hash,
                at,
                Cow::Borrowed(&evaluation.members),
            );
            let (value, next) = ctx.segment(idx);
            if value != evaluation.members[idx] {
                best = Some(at);
                break;
            }
            candidate = next.filter(|next| *next > at);
        }
        checks[idx] = candidate;
    }
    checks
}

impl<'p, 'm> Ctx<'p, 'm> {
    pub(super) fn new(
        program: &'p Program,
        state: &'p CustomerState,
        bucket_hash: u64,
        t: Millis,
        members: Cow<'m, [bool]>,
    ) -> Self {
        Ctx {
            program,
            state,
            t,
            bucket_hash,
            members,
            record: true,
            breakpoint: None,
            flips: Vec::new(),
        }
    }

    /// Evaluates one segment at `self.t`: its value and its next candidate instant.
    fn segment(&mut self, idx: usize) -> (bool, Option<Millis>) {
        self.breakpoint = None;
        self.flips.clear();
        let program: &'p Program = self.program;
        let value = self.eval(&program.segments[idx].expr).truthy();
        let flips = std::mem::take(&mut self.flips);
        let mut next = self.breakpoint;
        for flip in &flips {
            if let Some(at) = self.refine_flip(flip, next) {
                next = Some(next.map_or(at, |current| current.min(at)));
            }
        }
        self.flips = flips;
        (value, next)
    }

    fn note_breakpoint(&mut self, at: Option<Millis>) {
        if !self.record {
            return;
        }
        if let Some(at) = at.filter(|at| *at > self.t) {
            self.breakpoint = Some(self.breakpoint.map_or(at, |bp| bp.min(at)));
        }
    }

    pub(super) fn eval(&mut self, expr: &'p CExpr) -> Val<'p> {
        match expr {
            CExpr::Const(constant) => match constant {
                Const::Null => Val::Null,
                Const::Bool(flag) => Val::Bool(*flag),
                Const::Num(n) => Val::Num(Lin::constant(*n)),
                Const::Dur(d) => Val::Dur(Lin::constant(*d)),
                Const::Time(at) => Val::Time(Lin::constant(*at)),
                Const::Str(text) => Val::Str(text),
            },
            CExpr::Trait { slot, path } => {
                let state: &'p CustomerState = self.state;
                let Some(stored) = state.traits.get(*slot).and_then(Option::as_ref) else {
                    return Val::Null;
                };
                let mut value = &stored.value;
                for key in path {
                    match value.as_object().and_then(|object| object.get(key)) {
                        Some(inner) => value = inner,
                        None => return Val::Null,
                    }
                }
                json_val(value)
            }
            CExpr::Count(source) => match *source {
                Source::Total(slot) => {
                    let count = self.state.totals.get(slot).map_or(0, |total| total.count);
                    Val::Num(Lin::constant(count as f64))
                }
                Source::Window { series, window } => {
                    let stats = self.window(series, window);
                    Val::Num(Lin::constant(stats.count as f64))
                }
            },
            CExpr::Aggregate { func, source } => {
                let (values, sum, min, max) = match *source {
                    Source::Total(slot) => {
                        let total = self.state.totals.get(slot).copied().unwrap_or_default();
                        (total.values, total.sum, total.min, total.max)
                    }
                    Source::Window { series, window } => {
                        let stats = self.window(series, window);
                        (stats.values, stats.sum, stats.min, stats.max)
                    }
                };
                let result = match func {
                    AggFunc::Sum => Some(if values == 0 { 0.0 } else { sum }),
                    _ if values == 0 => None,
                    AggFunc::Avg => Some(sum / values as f64),
                    AggFunc::Min => Some(min),
                    AggFunc::Max => Some(max),
                };
                result.map_or(Val::Null, |n| Val::Num(Lin::constant(n)))
            }
            CExpr::Last(slot) => {
                let last = self.state.extremes.get(*slot).and_then(|e| e.last);
                Val::Time(Lin::constant(
                    last.map_or(f64::NEG_INFINITY, |at| at as f64),
                ))
            }
            CExpr::First(slot) => {
                let first = self.state.extremes.get(*slot).and_then(|e| e.first);
                Val::Time(Lin::constant(
                    first.map_or(f64::NEG_INFINITY, |at| at as f64),
                ))
            }
            CExpr::Since(inner) => match self.eval(inner) {
                Val::Time(at) => {
                    Lin::normalized(self.t as f64 - at.v, 1.0 - at.k).map_or(Val::Null, Val::Dur)
                }
                _ => Val::Null,
            },
            CExpr::InSegment(idx) => Val::Bool(self.members.get(*idx).copied().unwrap_or(false)),
            CExpr::Bucket(n) => Val::Num(Lin::constant((self.bucket_hash % n) as f64)),
            CExpr::Not(inner) => Val::Bool(!self.eval(inner).truthy()),
            CExpr::Neg(inner) => match self.eval(inner) {
                Val::Num(lin) => Val::Num(Lin {
                    v: -lin.v,
                    k: -lin.k,
                }),
                Val::Dur(lin) => Val::Dur(Lin {
                    v: -lin.v,
                    k: -lin.k,
                }),
                _ => Val::Null,
            },
            CExpr::And(lhs, rhs) => Val::Bool(self.eval(lhs).truthy() && self.eval(rhs).truthy()),
            CExpr::Or(lhs, rhs) => Val::Bool(self.eval(lhs).truthy() || self.eval(rhs).truthy()),
            CExpr::Arith(op, lhs, rhs) => {
                let left = self.eval(lhs);
                let right = self.eval(rhs);
                arithmetic(*op, left, right)
            }
            CExpr::Compare(op, lhs, rhs) => {
                let left = self.eval(lhs);
                let right = self.eval(rhs);
                let ordering = self.compare_recording(lhs, rhs, left, right);
                Val::Bool(ordering.is_some_and(|o| op_holds(*op, o)))
            }
            CExpr::In(lhs, items) => {
                let left = self.eval(lhs);
                let mut found = false;
                for item in items {
                    let right = self.eval(item);
                    if self.compare_recording(lhs, item, left, right) == Some(Ordering::Equal) {
                        found = true;
                    }
                }
                Val::Bool(found)
            }
            CExpr::IsNull { expr, negated } => {
                let is_null = self.eval(expr) == Val::Null;
                Val::Bool(is_null != *negated)
            }
        }
    }

    fn window(&mut self, series: usize, window: i64) -> WindowStats {
        let stats = self
            .state
            .series
            .get(series)
            .map(|s| s.window(self.t, window))
            .unwrap_or_default();
        self.note_breakpoint(stats.next_change);
        stats
    }

    /// Compares two values; if their difference moves with time, records when it may flip.
    fn compare_recording(
        &mut self,
        lhs: &'p CExpr,
        rhs: &'p CExpr,
        left: Val<'p>,
        right: Val<'p>,
    ) -> Option<Ordering> {
        let ordering = compare(left, right);
        if !self.record {
            return ordering;
        }
        let (Some(a), Some(b)) = (left.lin(), right.lin()) else {
            return ordering;
        };
        let slope = a.k - b.k;
        if slope == 0.0 || !a.v.is_finite() || !b.v.is_finite() {
            return ordering;
        }
        let gap = b.v - a.v;
        let dt = gap / slope;
        let estimate = if gap == 0.0 {
            self.t as f64 + 1.0
        } else if dt > 0.0 {
            self.t as f64 + dt
        } else {
            return ordering;
        };
        self.flips.push(PendingFlip {
            lhs,
            rhs,
            ordering,
            estimate,
        });
        ordering
    }

    /// The ordering of a comparison's sides at instant `at` (same state).
    fn ordering_at(&self, flip: &PendingFlip<'p>, at: Millis) -> Option<Ordering> {
        let mut probe = Ctx {
            program: self.program,
            state: self.state,
            t: at,
            bucket_hash: self.bucket_hash,
            members: Cow::Borrowed(&self.members),
            record: false,
            breakpoint: None,
            flips: Vec::new(),
        };
        let left = probe.eval(flip.lhs);
        let right = probe.eval(flip.rhs);
        compare(left, right)
    }

    /// The exact first millisecond after `t` (and before `bound`, the next breakpoint) at which
    /// the comparison's ordering differs from now. Within that range both sides are linear in
    /// time, so the ordering changes monotonically and a local search around the estimate is
    /// exact.
    fn refine_flip(&self, flip: &PendingFlip<'p>, bound: Option<Millis>) -> Option<Millis> {
        let differs = |at: Millis| self.ordering_at(flip, at) != flip.ordering;
        let limit = bound.unwrap_or(i64::MAX / 4);
        if flip.estimate >= limit as f64 {
            return None;
        }
        let guess = (flip.estimate.ceil() as i64)
            .clamp(self.t + 1, limit.saturating_sub(1).max(self.t + 1));
        if guess >= limit {
            return None;
        }
        if differs(guess) {
            if guess - 1 > self.t && !differs(guess - 1) {
                return Some(guess);
            }
            return Some(first_differing(self.t, guess, differs));
        }
        let mut low = guess;
        let mut step: i64 = 1;
        loop {
            let high = low.saturating_add(step).min(limit - 1);
            if high <= low {
                return None;
            }
            if differs(high) {
                return Some(first_differing(low, high, differs));
            }
            if high >= limit - 1 || step > (1 << 52) {
                return None;
            }
            low = high;
            step *= 2;
        }
    }
}

/// Binary search for the first instant in `(low, high]` where `differs` holds, given that it
/// does not hold at `low`, holds at `high`, and is monotone in between.
fn first_differing(mut low: Millis, mut high: Millis, differs: impl Fn(Millis) -> bool) -> Millis {
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if differs(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    high
}

fn json_val(value: &Value) -> Val<'_> {
    match value {
        Value::Bool(flag) => Val::Bool(*flag),
        Value::Number(number) => number
            .as_f64()
            .map_or(Val::Null, |n| Val::Num(Lin::constant(n))),
        Value::String(text) => Val::Str(text),
        _ => Val::Null,
    }
}

/// Orders two values of the same kind; `None` for null, mismatched kinds or NaN.
fn compare(left: Val<'_>, right: Val<'_>) -> Option<Ordering> {
    match (left, right) {
        (Val::Num(a), Val::Num(b)) | (Val::Dur(a), Val::Dur(b)) | (Val::Time(a), Val::Time(b)) => {
            a.v.partial_cmp(&b.v)
        }
        (Val::Str(a), Val::Str(b)) => Some(a.cmp(b)),
        (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(&b)),
        _ => None,
    }
}

fn arithmetic<'a>(op: BinOp, left: Val<'a>, right: Val<'a>) -> Val<'a> {
    let (Some(a), Some(b)) = (left.lin(), right.lin()) else {
        return Val::Null;
    };
    let wrap =
        |kind: fn(Lin) -> Val<'a>, v: f64, k: f64| Lin::normalized(v, k).map_or(Val::Null, kind);
    match (op, left, right) {
        (BinOp::Add, Val::Num(_), Val::Num(_)) => wrap(Val::Num, a.v + b.v, a.k + b.k),
        (BinOp::Add, Val::Dur(_), Val::Dur(_)) => wrap(Val::Dur, a.v + b.v, a.k + b.k),
        (BinOp::Add, Val::Time(_), Val::Dur(_)) | (BinOp::Add, Val::Dur(_), Val::Time(_)) => {
            wrap(Val::Time, a.v + b.v, a.k + b.k)
        }
        (BinOp::Sub, Val::Num(_), Val::Num(_)) => wrap(Val::Num, a.v - b.v, a.k - b.k),
        (BinOp::Sub, Val::Dur(_), Val::Dur(_)) => wrap(Val::Dur, a.v - b.v, a.k - b.k),
        (BinOp::Sub, Val::Time(_), Val::Dur(_)) => wrap(Val::Time, a.v - b.v, a.k - b.k),
        (BinOp::Sub, Val::Time(_), Val::Time(_)) => wrap(Val::Dur, a.v - b.v, a.k - b.k),
        (BinOp::Mul, Val::Num(_), Val::Num(_)) => wrap(Val::Num, a.v * b.v, a.k * b.v + b.k * a.v),
        (BinOp::Mul, Val::Dur(_), Val::Num(_)) | (BinOp::Mul, Val::Num(_), Val::Dur(_)) => {
            wrap(Val::Dur, a.v * b.v, a.k * b.v + b.k * a.v)
        }
        (BinOp::Div, _, _) if b.v == 0.0 => Val::Null,
        (BinOp::Div, Val::Num(_), Val::Num(_)) | (BinOp::Div, Val::Dur(_), Val::Dur(_)) => {
            wrap(Val::Num, a.v / b.v, a.k / b.v)
        }
        (BinOp::Div, Val::Dur(_), Val::Num(_)) => wrap(Val::Dur, a.v / b.v, a.k / b.v),
        _ => Val::Null,
    }
}
