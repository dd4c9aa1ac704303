//! Type-checking and lowering: parsed rules → [`Program`].
//!
//! Every segment is checked; all errors are collected (each with its segment and span) before
//! failing. Unknown segments in `in_segment` and dependency cycles are errors here too.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::ast::{BinOp, Expr, ExprKind, Matcher};
use super::error::{RuleError, Span};
use super::parser::parse;
use super::program::{
    CExpr, CMatcher, CompiledSegment, Const, FeatureLayout, Program, SeriesSpec, Source, TotalSpec,
};
use crate::model::change::hex;

/// A segment as the user wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentDef {
    pub id: String,
    pub description: Option<String>,
    pub rule: String,
}

/// A rule error attributed to a segment (by index into the definitions).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentError {
    pub segment: usize,
    pub error: RuleError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Num,
    Dur,
    Time,
    Str,
    /// A trait or property: its type is known only at run time.
    Dyn,
    Null,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "a boolean",
            Ty::Num => "a number",
            Ty::Dur => "a duration",
            Ty::Time => "a time",
            Ty::Str => "a string",
            Ty::Dyn => "a trait value",
            Ty::Null => "null",
        }
    }
}

/// The type of a checked expression and whether it moves with the clock (via `since`).
#[derive(Debug, Clone, Copy)]
struct Typed {
    ty: Ty,
    varying: bool,
    /// Reads a window or `since`: its value can change with no new event.
    time_dependent: bool,
}

/// Compiles every segment; returns all errors at once.
pub fn compile(defs: &[SegmentDef]) -> Result<Program, Vec<SegmentError>> {
    let ids: HashMap<&str, usize> = defs
        .iter()
        .enumerate()
        .map(|(idx, def)| (def.id.as_str(), idx))
        .collect();
    let mut builder = LayoutBuilder::default();
    let mut errors = Vec::new();
    let mut lowered = Vec::with_capacity(defs.len());
    for (idx, def) in defs.iter().enumerate() {
        let outcome = parse(&def.rule).and_then(|ast| {
            let mut lowerer = Lowerer {
                ids: &ids,
                builder: &mut builder,
                depends_on: Vec::new(),
            };
            let (expr, typed) = lowerer.lower(&ast)?;
            if !matches!(typed.ty, Ty::Bool | Ty::Dyn) {
                return Err(RuleError::new(
                    ast.span,
                    format!(
                        "a rule must be true or false, but this is {}",
                        typed.ty.name()
                    ),
                ));
            }
            Ok((ast, expr, lowerer.depends_on, typed.time_dependent))
        });
        match outcome {
            Ok(parts) => lowered.push(Some(parts)),
            Err(error) => {
                errors.push(SegmentError {
                    segment: idx,
                    error,
                });
                lowered.push(None);
            }
        }
    }
    let deps: Vec<Vec<(usize, Span)>> = lowered
        .iter()
        .map(|parts| parts.as_ref().map(|p| p.2.clone()).unwrap_or_default())
        .collect();
    let eval_order = match topological_order(defs, &deps) {
        Ok(order) => order,
        Err(cycle_errors) => {
            errors.extend(cycle_errors);
            Vec::new()
        }
    };
    if !errors.is_empty() {
        errors.sort_by_key(|err| (err.segment, err.error.span.start));
        return Err(errors);
    }
    let mut versions: Vec<String> = vec![String::new(); defs.len()];
    for &idx in &eval_order {
        let Some((ast, _, depends, _)) = &lowered[idx] else {
            continue;
        };
        let mut hasher = Sha256::new();
        hasher.update(defs[idx].id.as_bytes());
        hasher.update([0]);
        hasher.update(ast.to_string().as_bytes());
        for (dep, _) in depends {
            hasher.update([0]);
            hasher.update(versions[*dep].as_bytes());
        }
        versions[idx] = hex(&hasher.finalize()[..8]);
    }
    let mut program_hasher = Sha256::new();
    let mut segments = Vec::with_capacity(defs.len());
    for (idx, (def, parts)) in defs.iter().zip(lowered).enumerate() {
        let Some((ast, expr, depends, time_dependent)) = parts else {
            continue;
        };
        program_hasher.update(versions[idx].as_bytes());
        let mut depends_on: Vec<usize> = depends.iter().map(|(dep, _)| *dep).collect();
        depends_on.sort_unstable();
        depends_on.dedup();
        segments.push(CompiledSegment {
            id: def.id.clone(),
            description: def.description.clone(),
            rule_text: def.rule.clone(),
            canonical: ast.to_string(),
            ast: ast.clone(),
            version: versions[idx].clone(),
            expr,
            depends_on,
            time_dependent,
            dependents: Vec::new(),
        });
    }
    for idx in 0..segments.len() {
        for dep in segments[idx].depends_on.clone() {
            segments[dep].dependents.push(idx);
        }
    }
    let (matcher_readers, trait_readers) = readers(&segments, &eval_order, &builder.layout);
    Ok(Program {
        segments,
        eval_order,
        layout: builder.layout,
        version: hex(&program_hasher.finalize()[..8]),
        matcher_readers,
        trait_readers,
    })
}

/// Which segments read each matcher and trait, directly or through the segments they name.
fn readers(
    segments: &[CompiledSegment],
    eval_order: &[usize],
    layout: &FeatureLayout,
) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    fn collect(
        expr: &CExpr,
        layout: &FeatureLayout,
        matchers: &mut Vec<usize>,
        traits: &mut Vec<usize>,
    ) {
        let source_matcher = |source: &Source| match *source {
            Source::Total(slot) => layout.totals[slot].matcher,
            Source::Window { series, .. } => layout.series[series].matcher,
        };
        match expr {
            CExpr::Count(source) | CExpr::Aggregate { source, .. } => {
                matchers.push(source_matcher(source))
            }
            CExpr::Last(slot) | CExpr::First(slot) => matchers.push(layout.extremes[*slot]),
            CExpr::Trait { slot, .. } => traits.push(*slot),
            CExpr::Const(_) | CExpr::InSegment(_) | CExpr::Bucket(_) => {}
            CExpr::Since(inner) | CExpr::Not(inner) | CExpr::Neg(inner) => {
                collect(inner, layout, matchers, traits)
            }
            CExpr::IsNull { expr, .. } => collect(expr, layout, matchers, traits),
            CExpr::And(a, b)
            | CExpr::Or(a, b)
            | CExpr::Arith(_, a, b)
            | CExpr::Compare(_, a, b) => {
                collect(a, layout, matchers, traits);
                collect(b, layout, matchers, traits);
            }
            CExpr::In(a, items) => {
                collect(a, layout, matchers, traits);
                for item in items {
                    collect(item, layout, matchers, traits);
                }
            }
        }
    }
    let mut reads: Vec<(Vec<usize>, Vec<usize>)> = vec![(Vec::new(), Vec::new()); segments.len()];
    for &idx in eval_order {
        let (mut matchers, mut traits) = (Vec::new(), Vec::new());
        collect(&segments[idx].expr, layout, &mut matchers, &mut traits);
        for dep in &segments[idx].depends_on {
            matchers.extend(reads[*dep].0.iter().copied());
            traits.extend(reads[*dep].1.iter().copied());
        }
        matchers.sort_unstable();
        matchers.dedup();
        traits.sort_unstable();
        traits.dedup();
        reads[idx] = (matchers, traits);
    }
    let mut matcher_readers = vec![Vec::new(); layout.matchers.len()];
    let mut trait_readers = vec![Vec::new(); layout.traits.len()];
    for (idx, (matchers, traits)) in reads.iter().enumerate() {
        for m in matchers {
            matcher_readers[*m].push(idx);
        }
        for t in traits {
            trait_readers[*t].push(idx);
        }
    }
    (matcher_readers, trait_readers)
}

/// Kahn's algorithm, stable in definition order; segments on a cycle get an error at their
/// `in_segment` call.
fn topological_order(
    defs: &[SegmentDef],
    deps: &[Vec<(usize, Span)>],
) -> Result<Vec<usize>, Vec<SegmentError>> {
    let count = defs.len();
    let mut remaining: Vec<usize> = deps
        .iter()
        .map(|list| {
            let mut unique: Vec<usize> = list.iter().map(|(dep, _)| *dep).collect();
            unique.sort_unstable();
            unique.dedup();
            unique.len()
        })
        .collect();
    let mut order = Vec::with_capacity(count);
    let mut done = vec![false; count];
    loop {
        let ready = (0..count).find(|&idx| !done[idx] && remaining[idx] == 0);
        let Some(idx) = ready else { break };
        done[idx] = true;
        order.push(idx);
        for (other, list) in deps.iter().enumerate() {
            let mut unique: Vec<usize> = list.iter().map(|(dep, _)| *dep).collect();
            unique.sort_unstable();
            unique.dedup();
            if unique.contains(&idx) {
                remaining[other] -= 1;
            }
        }
    }
    if order.len() == count {
        return Ok(order);
    }
    let mut errors = Vec::new();
    for idx in (0..count).filter(|&idx| !done[idx]) {
        for &(dep, span) in &deps[idx] {
            if !done[dep] {
                let path = cycle_path(deps, &done, idx, dep)
                    .iter()
                    .map(|&node| defs[node].id.as_str())
                    .collect::<Vec<_>>()
                    .join(" -> ");
                errors.push(SegmentError {
                    segment: idx,
                    error: RuleError::new(
                        span,
                        format!("in_segment(\"{}\") forms a cycle: {path}", defs[dep].id),
                    ),
                });
                break;
            }
        }
    }
    Err(errors)
}

fn cycle_path(deps: &[Vec<(usize, Span)>], done: &[bool], start: usize, next: usize) -> Vec<usize> {
    let mut path = vec![start, next];
    let mut current = next;
    while current != start && path.len() <= deps.len() + 1 {
        let Some(&(step, _)) = deps[current].iter().find(|(dep, _)| !done[*dep]) else {
            break;
        };
        path.push(step);
        current = step;
    }
    path
}

#[derive(Default)]
struct LayoutBuilder {
    layout: FeatureLayout,
}

impl LayoutBuilder {
    fn matcher(&mut self, matcher: &Matcher) -> usize {
        let text = matcher.to_string();
        if let Some(idx) = self.layout.matchers.iter().position(|m| m.text == text) {
            return idx;
        }
        let conditions = matcher.conditions.clone();
        self.layout.matchers.push(CMatcher {
            event: matcher.event.clone(),
            conditions,
            text,
        });
        self.layout.matchers.len() - 1
    }

    fn source(
        &mut self,
        matcher: &Matcher,
        property: Option<&[String]>,
        window: Option<i64>,
    ) -> Source {
        let matcher = self.matcher(matcher);
        let property = property.map(<[String]>::to_vec);
        match window {
            None => {
                let spec = TotalSpec { matcher, property };
                let slot = match self.layout.totals.iter().position(|t| *t == spec) {
                    Some(slot) => slot,
                    None => {
                        self.layout.totals.push(spec);
                        self.layout.totals.len() - 1
                    }
                };
                Source::Total(slot)
            }
            Some(window) => {
                let found = self
                    .layout
                    .series
                    .iter()
                    .position(|s| s.matcher == matcher && s.property == property);
                let series = match found {
                    Some(slot) => {
                        let spec = &mut self.layout.series[slot];
                        spec.retention = spec.retention.max(window);
                        slot
                    }
                    None => {
                        self.layout.series.push(SeriesSpec {
                            matcher,
                            property,
                            retention: window,
                        });
                        self.layout.series.len() - 1
                    }
                };
                Source::Window { series, window }
            }
        }
    }

    fn extreme(&mut self, matcher: &Matcher) -> usize {
        let matcher = self.matcher(matcher);
        if let Some(slot) = self.layout.extremes.iter().position(|m| *m == matcher) {
            return slot;
        }
        self.layout.extremes.push(matcher);
        self.layout.extremes.len() - 1
    }

    fn trait_slot(&mut self, key: &str) -> usize {
        if let Some(slot) = self.layout.traits.iter().position(|name| name == key) {
            return slot;
        }
        self.layout.traits.push(key.to_string());
        self.layout.traits.len() - 1
    }
}

struct Lowerer<'a> {
    ids: &'a HashMap<&'a str, usize>,
    builder: &'a mut LayoutBuilder,
    depends_on: Vec<(usize, Span)>,
}

fn fixed(ty: Ty) -> Typed {
    Typed {
        ty,
        varying: false,
        time_dependent: false,
    }
}

impl Lowerer<'_> {
    fn lower(&mut self, expr: &Expr) -> Result<(CExpr, Typed), RuleError> {
        let span = expr.span;
        let out = match &expr.kind {
            ExprKind::Number(n) => (CExpr::Const(Const::Num(*n)), fixed(Ty::Num)),
            ExprKind::Str(s) => (CExpr::Const(Const::Str(s.clone())), fixed(Ty::Str)),
            ExprKind::Bool(b) => (CExpr::Const(Const::Bool(*b)), fixed(Ty::Bool)),
            ExprKind::Duration(ms) => (CExpr::Const(Const::Dur(*ms as f64)), fixed(Ty::Dur)),
            ExprKind::Never => (
                CExpr::Const(Const::Time(f64::NEG_INFINITY)),
                fixed(Ty::Time),
            ),
            ExprKind::Null => (CExpr::Const(Const::Null), fixed(Ty::Null)),
            ExprKind::Trait(path) => {
                let slot = self.builder.trait_slot(&path[0]);
                let lowered = CExpr::Trait {
                    slot,
                    path: path[1..].to_vec(),
                };
                (lowered, fixed(Ty::Dyn))
            }
            ExprKind::Count { matcher, window } => {
                let source = self.builder.source(matcher, None, *window);
                let typed = Typed {
                    ty: Ty::Num,
                    varying: false,
                    time_dependent: window.is_some(),
                };
                (CExpr::Count(source), typed)
            }
            ExprKind::Aggregate {
                func,
                matcher,
                property,
                window,
            } => {
                let source = self.builder.source(matcher, Some(property), *window);
                let typed = Typed {
                    ty: Ty::Num,
                    varying: false,
                    time_dependent: window.is_some(),
                };
                (
                    CExpr::Aggregate {
                        func: *func,
                        source,
                    },
                    typed,
                )
            }
            ExprKind::Last(matcher) => {
                (CExpr::Last(self.builder.extreme(matcher)), fixed(Ty::Time))
            }
            ExprKind::First(matcher) => {
                (CExpr::First(self.builder.extreme(matcher)), fixed(Ty::Time))
            }
            ExprKind::Since(inner) => {
                let (lowered, typed) = self.lower(inner)?;
                if typed.ty != Ty::Time {
                    return Err(RuleError::new(
                        inner.span,
                        format!(
                            "since() takes a time such as last(\"Event\"), not {}",
                            typed.ty.name()
                        ),
                    ));
                }
                let out = Typed {
                    ty: Ty::Dur,
                    varying: true,
                    time_dependent: true,
                };
                (CExpr::Since(Box::new(lowered)), out)
            }
            ExprKind::InSegment(id) => {
                let Some(&idx) = self.ids.get(id.as_str()) else {
                    return Err(RuleError::new(
                        span,
                        format!("unknown segment '{id}' in in_segment"),
                    ));
                };
                self.depends_on.push((idx, span));
                (CExpr::InSegment(idx), fixed(Ty::Bool))
            }
            ExprKind::Bucket(n) => (CExpr::Bucket(*n), fixed(Ty::Num)),
            ExprKind::Not(inner) => {
                let (lowered, typed) = self.lower(inner)?;
                self.expect_bool(typed, inner.span, "'not'")?;
                (
                    CExpr::Not(Box::new(lowered)),
                    Typed {
                        ty: Ty::Bool,
                        ..typed
                    },
                )
            }
            ExprKind::Neg(inner) => {
                let (lowered, typed) = self.lower(inner)?;
                let ty = match typed.ty {
                    Ty::Num | Ty::Dyn => Ty::Num,
                    Ty::Dur => Ty::Dur,
                    other => {
                        return Err(RuleError::new(
                            inner.span,
                            format!("cannot negate {}", other.name()),
                        ))
                    }
                };
                (CExpr::Neg(Box::new(lowered)), Typed { ty, ..typed })
            }
            ExprKind::Binary { op, lhs, rhs } => self.binary(*op, lhs, rhs, span)?,
            ExprKind::In { expr: inner, list } => {
                let (lowered, typed) = self.lower(inner)?;
                let mut items = Vec::with_capacity(list.len());
                let mut out = Typed {
                    ty: Ty::Bool,
                    ..typed
                };
                for item in list {
                    let (item_lowered, item_typed) = self.lower(item)?;
                    comparable(typed.ty, item_typed.ty, item.span)?;
                    out.varying |= item_typed.varying;
                    out.time_dependent |= item_typed.time_dependent;
                    items.push(item_lowered);
                }
                out.varying = false;
                (CExpr::In(Box::new(lowered), items), out)
            }
            ExprKind::IsNull {
                expr: inner,
                negated,
            } => {
                let (lowered, typed) = self.lower(inner)?;
                let out = Typed {
                    ty: Ty::Bool,
                    varying: false,
                    time_dependent: typed.time_dependent,
                };
                let lowered = CExpr::IsNull {
                    expr: Box::new(lowered),
                    negated: *negated,
                };
                (lowered, out)
            }
        };
        Ok(out)
    }

    fn expect_bool(&self, typed: Typed, span: Span, what: &str) -> Result<(), RuleError> {
        if matches!(typed.ty, Ty::Bool | Ty::Dyn) {
            return Ok(());
        }
        Err(RuleError::new(
            span,
            format!(
                "{what} needs true or false, but this is {}",
                typed.ty.name()
            ),
        ))
    }

    fn binary(
        &mut self,
        op: BinOp,
        lhs: &Expr,
        rhs: &Expr,
        span: Span,
    ) -> Result<(CExpr, Typed), RuleError> {
        let (left, lt) = self.lower(lhs)?;
        let (right, rt) = self.lower(rhs)?;
        let time_dependent = lt.time_dependent || rt.time_dependent;
        let boxed = (Box::new(left), Box::new(right));
        match op {
            BinOp::And | BinOp::Or => {
                self.expect_bool(lt, lhs.span, &format!("'{}'", op.symbol()))?;
                self.expect_bool(rt, rhs.span, &format!("'{}'", op.symbol()))?;
                let lowered = if op == BinOp::And {
                    CExpr::And(boxed.0, boxed.1)
                } else {
                    CExpr::Or(boxed.0, boxed.1)
                };
                let typed = Typed {
                    ty: Ty::Bool,
                    varying: false,
                    time_dependent,
                };
                Ok((lowered, typed))
            }
            _ if op.is_comparison() => {
                if lt.ty == Ty::Null || rt.ty == Ty::Null {
                    return Err(RuleError::new(
                        span,
                        "comparing with null is always false; use 'is null' or 'is not null'",
                    ));
                }
                comparable(lt.ty, rt.ty, span)?;
                if lt.ty == Ty::Bool && !matches!(op, BinOp::Eq | BinOp::Ne) {
                    return Err(RuleError::new(
                        span,
                        "booleans can only be compared with == or !=",
                    ));
                }
                let typed = Typed {
                    ty: Ty::Bool,
                    varying: false,
                    time_dependent,
                };
                Ok((CExpr::Compare(op, boxed.0, boxed.1), typed))
            }
            _ => {
                let ty = arithmetic_type(op, lt.ty, rt.ty).ok_or_else(|| {
                    RuleError::new(
                        span,
                        format!(
                            "cannot compute {} {} {}",
                            lt.ty.name(),
                            op.symbol(),
                            rt.ty.name()
                        ),
                    )
                })?;
                if op == BinOp::Mul && lt.varying && rt.varying {
                    return Err(RuleError::new(
                        span,
                        "cannot multiply two values that both change with time (since(...)); only sums and scaling by constants are supported",
                    ));
                }
                if op == BinOp::Div && rt.varying {
                    return Err(RuleError::new(
                        rhs.span,
                        "cannot divide by a value that changes with time (since(...)); divide the other side's constant instead",
                    ));
                }
                let typed = Typed {
                    ty,
                    varying: lt.varying || rt.varying,
                    time_dependent,
                };
                Ok((CExpr::Arith(op, boxed.0, boxed.1), typed))
            }
        }
    }
}

fn comparable(left: Ty, right: Ty, span: Span) -> Result<(), RuleError> {
    let ok = left == right
        || (left == Ty::Dyn && matches!(right, Ty::Num | Ty::Str | Ty::Bool))
        || (right == Ty::Dyn && matches!(left, Ty::Num | Ty::Str | Ty::Bool));
    if ok {
        return Ok(());
    }
    let hint = match (left, right) {
        (Ty::Dur, Ty::Num) | (Ty::Num, Ty::Dur) => " (write a duration with a unit, e.g. 30d)",
        (Ty::Time, Ty::Dur) | (Ty::Dur, Ty::Time) => {
            " (use since(...) to turn a time into a duration)"
        }
        _ => "",
    };
    Err(RuleError::new(
        span,
        format!("cannot compare {} with {}{hint}", left.name(), right.name()),
    ))
}

fn arithmetic_type(op: BinOp, left: Ty, right: Ty) -> Option<Ty> {
    let as_num = |ty: Ty| if ty == Ty::Dyn { Ty::Num } else { ty };
    let (left, right) = (as_num(left), as_num(right));
    match (op, left, right) {
        (_, Ty::Num, Ty::Num) => Some(Ty::Num),
        (BinOp::Add | BinOp::Sub, Ty::Dur, Ty::Dur) => Some(Ty::Dur),
        (BinOp::Add, Ty::Time, Ty::Dur) | (BinOp::Add, Ty::Dur, Ty::Time) => Some(Ty::Time),
        (BinOp::Sub, Ty::Time, Ty::Dur) => Some(Ty::Time),
        (BinOp::Sub, Ty::Time, Ty::Time) => Some(Ty::Dur),
        (BinOp::Mul, Ty::Dur, Ty::Num) | (BinOp::Mul, Ty::Num, Ty::Dur) => Some(Ty::Dur),
        (BinOp::Div, Ty::Dur, Ty::Num) => Some(Ty::Dur),
        (BinOp::Div, Ty::Dur, Ty::Dur) => Some(Ty::Num),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(id: &str, rule: &str) -> SegmentDef {
        SegmentDef {
            id: id.into(),
            description: None,
            rule: rule.into(),
        }
    }

    fn first_error(defs: &[SegmentDef]) -> SegmentError {
        compile(defs).expect_err("must fail").remove(0)
    }

    #[test]
    fn derives_only_the_needed_features() {
        let program = compile(&[
            def("a", r#"count("X", 7d) >= 2 and count("X", 1d) >= 1"#),
            def("b", r#"sum("O", "revenue", 30d) > 10 and count("O") > 0"#),
            def("c", r#"since(last("X")) > 1h and trait.country == "NL""#),
        ])
        .expect("compiles");
        let layout = &program.layout;
        assert_eq!(layout.series.len(), 2, "{layout:?}");
        assert_eq!(layout.series[0].retention, 7 * 86_400_000);
        assert_eq!(layout.totals.len(), 1);
        assert_eq!(layout.extremes.len(), 1);
        assert_eq!(layout.traits, vec!["country".to_string()]);
        assert!(program.segments.iter().all(|s| s.time_dependent));
    }

    #[test]
    fn type_errors() {
        let cases = [
            (
                r#"count("A") >= 1h"#,
                "cannot compare a number with a duration",
            ),
            (
                r#"since(last("A")) >= 5"#,
                "cannot compare a duration with a number",
            ),
            (r#"since(5) > 1h"#, "since() takes a time"),
            (r#"count("A")"#, "must be true or false"),
            (r#"count("A") and true"#, "needs true or false"),
            (
                r#"last("A") + last("B") > never"#,
                "cannot compute a time + a time",
            ),
            (
                r#"since(last("A")) / 1h * since(last("B")) > 1h"#,
                "both change with time",
            ),
            (
                r#"1h / since(last("B")) > 1"#,
                "divide by a value that changes",
            ),
            (
                r#"since(last("A")) * since(last("B")) > 1h"#,
                "cannot compute a duration * a duration",
            ),
            (r#"trait.x == null"#, "is null"),
        ];
        for (rule, words) in cases {
            let err = first_error(&[def("s", rule)]);
            assert!(
                err.error.message.contains(words),
                "{rule}: {}",
                err.error.message
            );
        }
    }

    #[test]
    fn unknown_segments_and_cycles() {
        let err = first_error(&[def("a", r#"in_segment("nope")"#)]);
        assert!(err.error.message.contains("unknown segment 'nope'"));
        let errors = compile(&[
            def("a", r#"in_segment("b")"#),
            def("b", r#"in_segment("a") or count(any) > 1"#),
            def("c", r#"count(any) > 1"#),
        ])
        .expect_err("cycle");
        assert_eq!(errors.len(), 2);
        assert!(
            errors[0].error.message.contains("a -> b -> a"),
            "{:?}",
            errors
        );
        let self_cycle = first_error(&[def("a", r#"in_segment("a")"#)]);
        assert!(self_cycle.error.message.contains("cycle"));
    }

    #[test]
    fn dependencies_come_first_and_versions_follow_them() {
        let defs = [
            def("vip", r#"in_segment("big") and bucket(100) < 10"#),
            def("big", r#"sum("O", "revenue", 365d) >= 1000"#),
        ];
        let program = compile(&defs).expect("compiles");
        assert_eq!(program.eval_order, vec![1, 0]);
        let changed = compile(&[
            defs[0].clone(),
            def("big", r#"sum("O", "revenue", 365d) >= 2000"#),
        ])
        .expect("compiles");
        assert_ne!(program.segments[0].version, changed.segments[0].version);
        let respaced = compile(&[
            def("vip", r#"in_segment("big")   and bucket(100)<10"#),
            defs[1].clone(),
        ])
        .expect("compiles");
        assert_eq!(program.segments[0].version, respaced.segments[0].version);
    }
}
