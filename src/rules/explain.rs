//! Why a customer is or is not in a segment: the rule's expression tree with the value of every
//! part at an instant, and the next instant at which the answer could change without a new
//! event. Uses the evaluator itself (not a second implementation), so an explanation can never
//! disagree with the decision it explains.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::{json, Value};

use super::ast::{Expr, ExprKind};
use super::eval::{evaluate, next_change, Ctx, Val};
use super::program::{CExpr, Program};
use crate::features::{fnv1a_64, CustomerState};
use crate::model::time::format_rfc3339;
use crate::model::Millis;

/// One part of a rule and its value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExplainNode {
    /// The part, as canonical rule text.
    pub text: String,
    /// Its value: a boolean, a number, a duration (`"2h 5m"`), a time (RFC 3339 or `"never"`),
    /// a string, or null.
    pub value: Value,
    /// The operands of `and` / `or` / `not`, comparisons and arithmetic (constants left out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<ExplainNode>,
}

/// The answer to "why is (or isn't) this customer in this segment?".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub segment: String,
    /// The rule's value now (what the membership becomes at the next evaluation).
    pub member: bool,
    pub rule: ExplainNode,
    /// The earliest instant the answer could change with no new event (a lower bound: the rule
    /// is re-checked then), `None` if only a new event can change it.
    pub next_change: Option<Millis>,
}

/// Explains segment `idx` for a customer at `t`.
pub fn explain(
    program: &Program,
    state: &CustomerState,
    customer_id: &str,
    t: Millis,
    idx: usize,
    lookahead_steps: usize,
) -> Explanation {
    let mut evaluation = evaluate(program, state, customer_id, t);
    let members = evaluation.members.clone();
    let segment = &program.segments[idx];
    let mut ctx = Ctx::new(
        program,
        state,
        fnv1a_64(customer_id.as_bytes()),
        t,
        Cow::Borrowed(&members),
    );
    let rule = node(&mut ctx, &segment.ast, &segment.expr);
    // Only this segment and what it reads (via in_segment) decide when its answer can change.
    let mut relevant = vec![false; program.segments.len()];
    let mut stack = vec![idx];
    while let Some(at) = stack.pop() {
        if !std::mem::replace(&mut relevant[at], true) {
            stack.extend(&program.segments[at].depends_on);
        }
    }
    evaluation.evaluated = relevant.clone();
    let checks = next_change(
        program,
        state,
        customer_id,
        &evaluation,
        None,
        lookahead_steps,
    );
    let next = checks
        .iter()
        .zip(&relevant)
        .filter(|(_, relevant)| **relevant)
        .filter_map(|(check, _)| *check)
        .min();
    Explanation {
        segment: segment.id.clone(),
        member: evaluation.members[idx],
        rule,
        next_change: next,
    }
}

fn node<'p>(ctx: &mut Ctx<'p, '_>, ast: &Expr, expr: &'p CExpr) -> ExplainNode {
    let value = render(ctx.eval(expr));
    let operands: Vec<(&Expr, &'p CExpr)> = match (&ast.kind, expr) {
        (ExprKind::Binary { lhs, rhs, .. }, CExpr::And(a, b))
        | (ExprKind::Binary { lhs, rhs, .. }, CExpr::Or(a, b))
        | (ExprKind::Binary { lhs, rhs, .. }, CExpr::Compare(_, a, b))
        | (ExprKind::Binary { lhs, rhs, .. }, CExpr::Arith(_, a, b)) => {
            vec![(lhs.as_ref(), a.as_ref()), (rhs.as_ref(), b.as_ref())]
        }
        (ExprKind::Not(inner), CExpr::Not(c))
        | (ExprKind::Neg(inner), CExpr::Neg(c))
        | (ExprKind::Since(inner), CExpr::Since(c))
        | (ExprKind::IsNull { expr: inner, .. }, CExpr::IsNull { expr: c, .. }) => {
            vec![(inner.as_ref(), c.as_ref())]
        }
        (ExprKind::In { expr: inner, list }, CExpr::In(c, items)) if list.len() == items.len() => {
            std::iter::once((inner.as_ref(), c.as_ref()))
                .chain(list.iter().zip(items.iter()))
                .collect()
        }
        _ => Vec::new(),
    };
    let parts = operands
        .into_iter()
        .filter(|(_, c)| !matches!(c, CExpr::Const(_)))
        .map(|(a, c)| node(ctx, a, c))
        .collect();
    ExplainNode {
        text: ast.to_string(),
        value,
        parts,
    }
}

fn render(value: Val<'_>) -> Value {
    match value {
        Val::Null => Value::Null,
        Val::Bool(flag) => Value::Bool(flag),
        Val::Num(lin) => json!(lin.v),
        Val::Dur(lin) => Value::String(format_duration(lin.v)),
        Val::Time(lin) if lin.v.is_finite() => Value::String(format_rfc3339(lin.v as Millis)),
        Val::Time(_) => Value::String("never".into()),
        Val::Str(text) => Value::String(text.to_string()),
    }
}

/// `93784005` ms → `"1d 2h 3m 4.005s"`.
pub fn format_duration(ms: f64) -> String {
    if !ms.is_finite() {
        return if ms > 0.0 { "forever" } else { "-forever" }.into();
    }
    let sign = if ms < 0.0 { "-" } else { "" };
    let mut rest = ms.abs().round() as u64;
    let mut parts = Vec::new();
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)] {
        if rest >= size {
            parts.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    if rest > 0 || parts.is_empty() {
        if rest.is_multiple_of(1000) {
            parts.push(format!("{}s", rest / 1000));
        } else {
            parts.push(format!("{}.{:03}s", rest / 1000, rest % 1000));
        }
    }
    format!("{sign}{}", parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::compile_rules as program;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(format_duration(93_784_005.0), "1d 2h 3m 4.005s");
        assert_eq!(format_duration(3_600_000.0), "1h");
        assert_eq!(format_duration(0.0), "0s");
        assert_eq!(format_duration(-1500.0), "-1.500s");
    }

    #[test]
    fn explains_each_condition_and_when_the_answer_changes() {
        let program = program(&[(
            "cart_abandoner",
            r#"last("Product Added") > last("Order Completed") and since(last("Product Added")) >= 1h"#,
        )]);
        let mut state = CustomerState::new(&program.layout, program.segments.len());
        let added = program
            .layout
            .matchers
            .iter()
            .position(|m| m.event.as_deref() == Some("Product Added"))
            .expect("matcher");
        let slot = program
            .layout
            .extremes
            .iter()
            .position(|m| *m == added)
            .expect("extreme");
        state.extremes[slot].first = Some(1_000);
        state.extremes[slot].last = Some(1_000);

        let at = 1_000 + 60_000;
        let explanation = explain(&program, &state, "c1", at, 0, 64);
        assert!(!explanation.member);
        assert_eq!(explanation.rule.value, Value::Bool(false));
        let [added_after_order, waited] = explanation.rule.parts.as_slice() else {
            panic!("two conditions: {:?}", explanation.rule);
        };
        assert_eq!(added_after_order.value, Value::Bool(true));
        assert_eq!(
            added_after_order.parts[1].value,
            Value::String("never".into()),
            "no order yet"
        );
        assert_eq!(waited.value, Value::Bool(false));
        assert_eq!(waited.parts[0].text, r#"since(last("Product Added"))"#);
        assert_eq!(waited.parts[0].value, Value::String("1m".into()));
        assert_eq!(explanation.next_change, Some(1_000 + 3_600_000));

        let later = explain(&program, &state, "c1", 1_000 + 3_600_000, 0, 64);
        assert!(later.member);
        assert_eq!(later.next_change, None, "only an order can end it");
    }
}
