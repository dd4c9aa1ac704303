//! Engine tests, including the property test against a deliberately naive reference evaluator:
//! random event streams and random rules, the reference re-scanning every event of a customer at
//! every millisecond. Any window, timer or clock off-by-one shows up as a diff.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;
use crate::features::{fnv1a_64, Limits};
use crate::model::{Event, EventKind};
use crate::rules::ast::{AggFunc, BinOp, Condition, Expr, ExprKind, Literal, Matcher};
use crate::rules::compile_rules;
use crate::rules::parser::parse;
use crate::store::MemoryStore;

pub(super) fn program(rules: &[(&str, &str)]) -> Arc<Program> {
    Arc::new(compile_rules(rules))
}

pub(super) fn track(
    customer: &str,
    name: &str,
    ts: Millis,
    message_id: Option<&str>,
    properties: Value,
) -> Event {
    Event {
        customer_id: customer.into(),
        kind: EventKind::Activity { name: name.into() },
        timestamp: ts,
        message_id: message_id.map(str::to_string),
        properties: properties.as_object().cloned().unwrap_or_default(),
        traits: Map::new(),
    }
}

fn identify(customer: &str, ts: Millis, traits: Value) -> Event {
    Event {
        customer_id: customer.into(),
        kind: EventKind::Identify,
        timestamp: ts,
        message_id: None,
        properties: Map::new(),
        traits: traits.as_object().cloned().unwrap_or_default(),
    }
}

pub(super) fn test_config() -> EngineConfig {
    EngineConfig {
        limits: Limits {
            max_entries_per_series: 100_000,
            max_dedup_ids: 100_000,
            dedup_window: 1000,
        },
        ..EngineConfig::default()
    }
}

pub(super) type Row = (String, String, ChangeKind, Millis, u64, &'static str);

pub(super) fn rows(changes: &[Change]) -> Vec<Row> {
    changes
        .iter()
        .map(|c| {
            (
                c.customer_id.clone(),
                c.segment.clone(),
                c.kind,
                c.at,
                c.seq,
                c.cause.as_str(),
            )
        })
        .collect()
}

fn run_engine(program: Arc<Program>, events: &[Event], until: Option<Millis>) -> Vec<Change> {
    run_engine_with(program, events, until, test_config(), false)
}

/// [`run_engine`] with a config, optionally writing back to the store after every event.
fn run_engine_with(
    program: Arc<Program>,
    events: &[Event],
    until: Option<Millis>,
    config: EngineConfig,
    write_back_each: bool,
) -> Vec<Change> {
    let store = Arc::new(MemoryStore::default());
    let mut engine = PartitionEngine::open(0, program, store, config).expect("open");
    let mut out = Vec::new();
    for event in events {
        engine.apply_event(event, &mut out).expect("apply");
        if write_back_each {
            engine.flush().expect("flush");
        }
    }
    if let Some(until) = until {
        engine.advance(until, &mut out).expect("advance");
    }
    out
}

#[test]
fn cart_abandoner_enters_by_timer_at_the_exact_millisecond() {
    let program = program(&[(
        "cart_abandoner",
        r#"last("Product Added") > last("Order Completed") and since(last("Product Added")) >= 1h"#,
    )]);
    let events = [
        track("c1", "Product Added", 1_000, Some("m1"), json!({})),
        track("c2", "Product Added", 2_000, Some("m2"), json!({})),
        track("c2", "Order Completed", 3_000, Some("m3"), json!({})),
        track("c3", "page", 3_601_000, None, json!({})),
    ];
    let changes = run_engine(program, &events, None);
    assert_eq!(
        rows(&changes),
        vec![(
            "c1".into(),
            "cart_abandoner".into(),
            ChangeKind::Entered,
            3_601_000,
            1,
            "timer"
        )]
    );
}

#[test]
fn erasure_exits_every_membership_drops_state_and_timers_and_a_later_event_starts_afresh() {
    let program = program(&[
        ("active", "count(any, 1h) >= 1"),
        ("buyer", r#"count("Order Completed") >= 1"#),
        ("never_bought", r#"count("Order Completed") == 0"#),
    ]);
    let store = Arc::new(MemoryStore::default());
    let mut engine = PartitionEngine::open(0, program, store.clone(), test_config()).expect("open");
    let mut out = Vec::new();
    for event in [
        track("c1", "Order Completed", 1_000, None, json!({})),
        track("c2", "page", 1_500, None, json!({})),
    ] {
        engine.apply_event(&event, &mut out).expect("apply");
    }
    store.write(engine.take_writes()).expect("write");
    out.clear();

    assert!(engine.erase("c1", 2_000, &mut out).expect("erase"));
    assert_eq!(
        rows(&out),
        vec![
            (
                "c1".into(),
                "active".into(),
                ChangeKind::Exited,
                2_000,
                2,
                "deleted"
            ),
            (
                "c1".into(),
                "buyer".into(),
                ChangeKind::Exited,
                2_000,
                2,
                "deleted"
            ),
        ]
    );
    assert!(
        !engine.erase("c1", 2_000, &mut out).expect("erase"),
        "already erased"
    );
    assert!(!engine.erase("nobody", 2_000, &mut out).expect("erase"));
    store.write(engine.take_writes()).expect("write");
    assert_eq!(engine.customer_state("c1").expect("read"), None);
    let timers = store
        .scan_prefix(Table::Timers, &keys::partition_prefix(0))
        .expect("scan");
    assert_eq!(timers.len(), 1, "only c2's timer is left: {timers:?}");

    // The 1 h window of c1 would have ended at 3_601_000: erased, its timer never fires.
    out.clear();
    engine.advance(4_000_000, &mut out).expect("advance");
    assert_eq!(
        rows(&out),
        vec![(
            "c2".into(),
            "active".into(),
            ChangeKind::Exited,
            3_601_500,
            2,
            "timer"
        )]
    );

    // Seen again after erasure: a new customer as far as state goes (seq starts over).
    out.clear();
    let event = track("c1", "page", 4_000_000, None, json!({}));
    engine.apply_event(&event, &mut out).expect("apply");
    assert_eq!(
        rows(&out),
        vec![
            (
                "c1".into(),
                "active".into(),
                ChangeKind::Entered,
                4_000_000,
                1,
                "event"
            ),
            (
                "c1".into(),
                "never_bought".into(),
                ChangeKind::Entered,
                4_000_000,
                1,
                "event"
            ),
        ]
    );
}

#[test]
fn erasure_and_a_new_event_in_the_same_write_back_keep_only_the_new_state() {
    let program = program(&[("buyer", r#"count("Order Completed") >= 1"#)]);
    let store = Arc::new(MemoryStore::default());
    let mut engine = PartitionEngine::open(0, program, store.clone(), test_config()).expect("open");
    let mut out = Vec::new();
    let order = track("c1", "Order Completed", 1_000, None, json!({}));
    engine.apply_event(&order, &mut out).expect("apply");
    store.write(engine.take_writes()).expect("write");
    assert!(engine.erase("c1", 2_000, &mut out).expect("erase"));
    let page = track("c1", "page", 3_000, None, json!({}));
    engine.apply_event(&page, &mut out).expect("apply");
    store.write(engine.take_writes()).expect("write");
    let mut reopened =
        PartitionEngine::open(0, engine.program.clone(), store, test_config()).expect("open");
    let state = reopened
        .customer_state("c1")
        .expect("read")
        .expect("stored");
    assert_eq!(state.totals.iter().map(|t| t.count).sum::<u64>(), 0);
    assert!(!state.memberships[0].member);
    assert_eq!(state.memberships[0].seq, 0, "a fresh state");
}

#[test]
fn timer_due_at_an_event_fires_before_it() {
    let program = program(&[("inactive", "since(last(any)) >= 30d")]);
    let day = 86_400_000;
    let events = [
        track("c1", "page", 0, None, json!({})),
        track("c1", "page", 30 * day, None, json!({})),
    ];
    let changes = run_engine(program, &events, None);
    assert_eq!(
        rows(&changes),
        vec![
            (
                "c1".into(),
                "inactive".into(),
                ChangeKind::Entered,
                30 * day,
                1,
                "timer"
            ),
            (
                "c1".into(),
                "inactive".into(),
                ChangeKind::Exited,
                30 * day,
                2,
                "event"
            ),
        ]
    );
}

#[test]
fn state_survives_a_restart_on_the_same_store() {
    let program = program(&[("two_opens", r#"count("Email Opened", 14d) >= 2"#)]);
    let store = Arc::new(MemoryStore::default());
    let mut out = Vec::new();
    let mut engine =
        PartitionEngine::open(0, program.clone(), store.clone(), test_config()).expect("open");
    engine
        .apply_event(
            &track("c1", "Email Opened", 1_000, Some("a"), json!({})),
            &mut out,
        )
        .expect("apply");
    engine.flush().expect("flush");
    drop(engine);
    let mut engine = PartitionEngine::open(0, program, store, test_config()).expect("reopen");
    engine
        .apply_event(
            &track("c1", "Email Opened", 1_500, Some("a"), json!({})),
            &mut out,
        )
        .expect("apply");
    assert!(
        out.is_empty(),
        "duplicate remembered across restart: {out:?}"
    );
    engine
        .apply_event(
            &track("c1", "Email Opened", 3_000, Some("b"), json!({})),
            &mut out,
        )
        .expect("apply");
    engine
        .advance(1_000 + 14 * 86_400_000, &mut out)
        .expect("advance");
    assert_eq!(
        rows(&out),
        vec![
            (
                "c1".into(),
                "two_opens".into(),
                ChangeKind::Entered,
                3_000,
                1,
                "event"
            ),
            (
                "c1".into(),
                "two_opens".into(),
                ChangeKind::Exited,
                1_000 + 14 * 86_400_000,
                2,
                "timer"
            ),
        ]
    );
}

#[test]
fn bounded_advance_fires_in_slices_and_a_due_timer_precedes_its_customers_event() {
    let program = program(&[("quiet", "since(last(any)) >= 100ms")]);
    let store = Arc::new(MemoryStore::default());
    let config = EngineConfig {
        clock: ClockMode::Wall,
        ..test_config()
    };
    let mut engine = PartitionEngine::open(0, program, store, config).expect("open");
    let mut out = Vec::new();
    engine.advance(0, &mut out).expect("advance");
    for (customer, ts) in [("a", 0), ("b", 10), ("c", 20)] {
        engine.advance(ts, &mut out).expect("advance");
        engine
            .apply_event(&track(customer, "page", ts, None, json!({})), &mut out)
            .expect("apply");
    }
    assert!(out.is_empty());
    let more = engine.advance_bounded(500, 1, &mut out).expect("slice");
    assert!(more, "two timers still due");
    assert_eq!(
        rows(&out),
        vec![(
            "a".into(),
            "quiet".into(),
            ChangeKind::Entered,
            100,
            1,
            "timer"
        )]
    );
    assert_eq!(
        engine.now(),
        Some(109),
        "the clock stops before the next unfired timer"
    );
    out.clear();
    engine
        .apply_event(&track("c", "page", 115, None, json!({})), &mut out)
        .expect("apply");
    assert!(
        out.is_empty(),
        "c's timer (due 120) is not due at 109: {out:?}"
    );
    engine.advance(500, &mut out).expect("advance");
    assert_eq!(
        rows(&out),
        vec![
            (
                "b".into(),
                "quiet".into(),
                ChangeKind::Entered,
                110,
                1,
                "timer"
            ),
            (
                "c".into(),
                "quiet".into(),
                ChangeKind::Entered,
                215,
                1,
                "timer"
            ),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// The naive reference: re-scans all of a customer's events at every millisecond.

#[derive(Debug, Clone, PartialEq)]
enum RVal {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

#[derive(Default, Clone)]
struct RefCustomer {
    /// (time, name, properties) of every applied activity.
    events: Vec<(Millis, String, Map<String, Value>)>,
    traits: HashMap<String, (Value, Millis)>,
    seen: Vec<(String, Millis)>,
    members: Vec<bool>,
    seqs: Vec<u64>,
}

struct Reference<'a> {
    segments: Vec<(String, Expr)>,
    order: &'a [usize],
}

fn prop_value<'a>(props: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let mut value = props.get(path.first()?)?;
    for key in &path[1..] {
        value = value.get(key)?;
    }
    Some(value)
}

fn literal_cmp(actual: Option<&Value>, op: BinOp, literal: &Literal) -> bool {
    let ordering = match (actual, literal) {
        (Some(Value::Number(n)), Literal::Number(l)) => n.as_f64().and_then(|n| n.partial_cmp(l)),
        (Some(Value::String(s)), Literal::Str(l)) => Some(s.as_str().cmp(l.as_str())),
        (Some(Value::Bool(b)), Literal::Bool(l)) if matches!(op, BinOp::Eq | BinOp::Ne) => {
            Some(b.cmp(l))
        }
        _ => None,
    };
    ordering.is_some_and(|o| crate::features::op_holds(op, o))
}

fn ref_matches(matcher: &Matcher, name: &str, props: &Map<String, Value>) -> bool {
    if matcher
        .event
        .as_deref()
        .is_some_and(|wanted| wanted != name)
    {
        return false;
    }
    matcher.conditions.iter().all(|condition| match condition {
        Condition::Compare { path, op, value } => literal_cmp(prop_value(props, path), *op, value),
        Condition::In { path, values } => values
            .iter()
            .any(|v| literal_cmp(prop_value(props, path), BinOp::Eq, v)),
        Condition::IsNull { path, negated } => {
            prop_value(props, path).is_none_or(Value::is_null) != *negated
        }
    })
}

impl Reference<'_> {
    fn eval(&self, expr: &Expr, c: &RefCustomer, id: &str, now: Millis, members: &[bool]) -> RVal {
        let in_range =
            |ts: Millis, window: &Option<i64>| ts <= now && window.is_none_or(|w| ts > now - w);
        match &expr.kind {
            ExprKind::Number(n) => RVal::Num(*n),
            ExprKind::Duration(d) => RVal::Num(*d as f64),
            ExprKind::Str(s) => RVal::Str(s.clone()),
            ExprKind::Bool(b) => RVal::Bool(*b),
            ExprKind::Never => RVal::Num(f64::NEG_INFINITY),
            ExprKind::Null => RVal::Null,
            ExprKind::Trait(path) => {
                let Some((value, _)) = c.traits.get(&path[0]) else {
                    return RVal::Null;
                };
                let mut value = value;
                for key in &path[1..] {
                    match value.get(key) {
                        Some(inner) => value = inner,
                        None => return RVal::Null,
                    }
                }
                match value {
                    Value::Number(n) => n.as_f64().map_or(RVal::Null, RVal::Num),
                    Value::String(s) => RVal::Str(s.clone()),
                    Value::Bool(b) => RVal::Bool(*b),
                    _ => RVal::Null,
                }
            }
            ExprKind::Count { matcher, window } => RVal::Num(
                c.events
                    .iter()
                    .filter(|(ts, name, props)| {
                        in_range(*ts, window) && ref_matches(matcher, name, props)
                    })
                    .count() as f64,
            ),
            ExprKind::Aggregate {
                func,
                matcher,
                property,
                window,
            } => {
                let values: Vec<f64> = c
                    .events
                    .iter()
                    .filter(|(ts, name, props)| {
                        in_range(*ts, window) && ref_matches(matcher, name, props)
                    })
                    .filter_map(|(_, _, props)| prop_value(props, property).and_then(Value::as_f64))
                    .collect();
                match func {
                    AggFunc::Sum => RVal::Num(values.iter().sum()),
                    _ if values.is_empty() => RVal::Null,
                    AggFunc::Avg => RVal::Num(values.iter().sum::<f64>() / values.len() as f64),
                    AggFunc::Min => RVal::Num(values.iter().copied().fold(f64::INFINITY, f64::min)),
                    AggFunc::Max => {
                        RVal::Num(values.iter().copied().fold(f64::NEG_INFINITY, f64::max))
                    }
                }
            }
            ExprKind::Last(matcher) | ExprKind::First(matcher) => {
                let times = c
                    .events
                    .iter()
                    .filter(|(ts, name, props)| *ts <= now && ref_matches(matcher, name, props))
                    .map(|(ts, _, _)| *ts);
                let found = if matches!(expr.kind, ExprKind::Last(_)) {
                    times.max()
                } else {
                    times.min()
                };
                RVal::Num(found.map_or(f64::NEG_INFINITY, |ts| ts as f64))
            }
            ExprKind::Since(inner) => match self.eval(inner, c, id, now, members) {
                RVal::Num(t) => RVal::Num(now as f64 - t),
                _ => RVal::Null,
            },
            ExprKind::InSegment(name) => {
                let idx = self
                    .segments
                    .iter()
                    .position(|(id, _)| id == name)
                    .expect("known");
                RVal::Bool(members[idx])
            }
            ExprKind::Bucket(n) => RVal::Num((fnv1a_64(id.as_bytes()) % n) as f64),
            ExprKind::Not(inner) => {
                RVal::Bool(self.eval(inner, c, id, now, members) != RVal::Bool(true))
            }
            ExprKind::Neg(inner) => match self.eval(inner, c, id, now, members) {
                RVal::Num(n) => RVal::Num(-n),
                _ => RVal::Null,
            },
            ExprKind::Binary { op, lhs, rhs } => {
                let left = self.eval(lhs, c, id, now, members);
                match op {
                    BinOp::And => {
                        return RVal::Bool(
                            left == RVal::Bool(true)
                                && self.eval(rhs, c, id, now, members) == RVal::Bool(true),
                        )
                    }
                    BinOp::Or => {
                        return RVal::Bool(
                            left == RVal::Bool(true)
                                || self.eval(rhs, c, id, now, members) == RVal::Bool(true),
                        )
                    }
                    _ => {}
                }
                let right = self.eval(rhs, c, id, now, members);
                if op.is_comparison() {
                    let ordering = match (&left, &right) {
                        (RVal::Num(a), RVal::Num(b)) => a.partial_cmp(b),
                        (RVal::Str(a), RVal::Str(b)) => Some(a.cmp(b)),
                        (RVal::Bool(a), RVal::Bool(b)) => Some(a.cmp(b)),
                        _ => None,
                    };
                    return RVal::Bool(ordering.is_some_and(|o| crate::features::op_holds(*op, o)));
                }
                let (RVal::Num(a), RVal::Num(b)) = (left, right) else {
                    return RVal::Null;
                };
                let result = match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    BinOp::Div if b == 0.0 => return RVal::Null,
                    BinOp::Div => a / b,
                    _ => return RVal::Null,
                };
                if result.is_nan() {
                    RVal::Null
                } else {
                    RVal::Num(result)
                }
            }
            ExprKind::In { expr: inner, list } => {
                let left = self.eval(inner, c, id, now, members);
                RVal::Bool(list.iter().any(|item| {
                    let right = self.eval(item, c, id, now, members);
                    match (&left, &right) {
                        (RVal::Num(a), RVal::Num(b)) => a == b,
                        (RVal::Str(a), RVal::Str(b)) => a == b,
                        (RVal::Bool(a), RVal::Bool(b)) => a == b,
                        _ => false,
                    }
                }))
            }
            ExprKind::IsNull {
                expr: inner,
                negated,
            } => RVal::Bool((self.eval(inner, c, id, now, members) == RVal::Null) != *negated),
        }
    }

    fn members(&self, c: &RefCustomer, id: &str, now: Millis) -> Vec<bool> {
        let mut members = vec![false; self.segments.len()];
        for &idx in self.order {
            members[idx] =
                self.eval(&self.segments[idx].1, c, id, now, &members) == RVal::Bool(true);
        }
        members
    }

    fn diff(
        &self,
        c: &mut RefCustomer,
        id: &str,
        now: Millis,
        cause: &'static str,
        out: &mut Vec<Row>,
    ) {
        let members = self.members(c, id, now);
        for (idx, &member) in members.iter().enumerate() {
            if member != c.members[idx] {
                c.members[idx] = member;
                c.seqs[idx] += 1;
                let kind = if member {
                    ChangeKind::Entered
                } else {
                    ChangeKind::Exited
                };
                out.push((
                    id.to_string(),
                    self.segments[idx].0.clone(),
                    kind,
                    now,
                    c.seqs[idx],
                    cause,
                ));
            }
        }
    }

    fn run(&self, events: &[Event], until: Option<Millis>, dedup_window: i64) -> Vec<Row> {
        let mut customers: BTreeMap<String, RefCustomer> = BTreeMap::new();
        let mut now: Option<Millis> = None;
        let mut out = Vec::new();
        let blank = RefCustomer {
            members: vec![false; self.segments.len()],
            seqs: vec![0; self.segments.len()],
            ..RefCustomer::default()
        };
        let step_to = |target: Millis,
                       customers: &mut BTreeMap<String, RefCustomer>,
                       now: &mut Option<Millis>,
                       out: &mut Vec<Row>| {
            if let Some(current) = *now {
                for tick in current + 1..=target {
                    for (id, c) in customers.iter_mut() {
                        self.diff(c, id, tick, "timer", out);
                    }
                }
            }
            *now = Some(now.map_or(target, |n| n.max(target)));
        };
        for event in events {
            step_to(event.timestamp, &mut customers, &mut now, &mut out);
            let current = now.unwrap_or(event.timestamp);
            let c = customers
                .entry(event.customer_id.clone())
                .or_insert_with(|| blank.clone());
            if let Some(mid) = &event.message_id {
                c.seen.retain(|(_, ts)| *ts > current - dedup_window);
                if c.seen.iter().any(|(seen, _)| seen == mid) {
                    continue;
                }
                c.seen.push((mid.clone(), current));
            }
            match &event.kind {
                EventKind::Identify => {
                    for (key, value) in &event.traits {
                        let newer = c
                            .traits
                            .get(key)
                            .is_none_or(|(_, at)| event.timestamp >= *at);
                        if newer {
                            c.traits
                                .insert(key.clone(), (value.clone(), event.timestamp));
                        }
                    }
                }
                EventKind::Activity { name } => {
                    c.events
                        .push((event.timestamp, name.clone(), event.properties.clone()));
                }
            }
            self.diff(c, &event.customer_id, current, "event", &mut out);
        }
        if let Some(until) = until {
            step_to(until, &mut customers, &mut now, &mut out);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Random rules and streams.

fn arb_matcher() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("any".to_string()),
        Just(r#""A""#.to_string()),
        Just(r#""B""#.to_string()),
        Just(r#""A" where v >= 5"#.to_string()),
        Just(r#""B" where k == "x""#.to_string()),
        Just(r#"any where k in ["x", "z"] and v < 8"#.to_string()),
        Just(r#""A" where v is null"#.to_string()),
    ]
}

fn arb_window() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        1 => Just(None),
        3 => (1u32..400).prop_map(|ms| Some(format!("{ms}ms"))),
        1 => Just(Some("1s".to_string())),
    ]
}

fn arb_numeric() -> impl Strategy<Value = String> {
    let window = |w: Option<String>| w.map(|w| format!(", {w}")).unwrap_or_default();
    prop_oneof![
        (arb_matcher(), arb_window()).prop_map(move |(m, w)| format!("count({m}{})", window(w))),
        (
            prop_oneof![Just("sum"), Just("avg"), Just("min"), Just("max")],
            arb_matcher(),
            arb_window()
        )
            .prop_map(move |(f, m, w)| format!(r#"{f}({m}, "v"{})"#, window(w))),
        Just("trait.t".to_string()),
        Just("bucket(7)".to_string()),
    ]
}

fn arb_atom(segment_idx: usize) -> BoxedStrategy<String> {
    let ops = prop_oneof![
        Just(">="),
        Just(">"),
        Just("<"),
        Just("<="),
        Just("=="),
        Just("!=")
    ];
    let mut choices: Vec<BoxedStrategy<String>> = vec![
        (arb_numeric(), ops.clone(), 0u32..5)
            .prop_map(|(n, op, k)| format!("{n} {op} {k}"))
            .boxed(),
        (arb_numeric(), arb_numeric(), ops.clone())
            .prop_map(|(a, b, op)| format!("{a} - {b} {op} 1"))
            .boxed(),
        (arb_matcher(), ops.clone(), 1u32..600)
            .prop_map(|(m, op, ms)| format!("since(last({m})) {op} {ms}ms"))
            .boxed(),
        (arb_matcher(), 1u32..300)
            .prop_map(|(m, ms)| format!("since(first({m})) / 2 >= {ms}ms"))
            .boxed(),
        (arb_matcher(), arb_matcher(), ops.clone())
            .prop_map(|(a, b, op)| format!("last({a}) {op} last({b})"))
            .boxed(),
        (arb_matcher(), arb_matcher(), 1u32..300)
            .prop_map(|(a, b, ms)| format!("since(last({a})) + since(first({b})) < {ms}ms"))
            .boxed(),
        (arb_matcher(), arb_window())
            .prop_map(|(m, w)| {
                format!(
                    r#"avg({m}, "v"{}) is null"#,
                    w.map(|w| format!(", {w}")).unwrap_or_default()
                )
            })
            .boxed(),
        Just(r#"trait.s in ["p", "q"]"#.to_string()).boxed(),
    ];
    if segment_idx > 0 {
        choices.push(
            (0..segment_idx)
                .prop_map(|i| format!(r#"in_segment("s{i}")"#))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(choices).boxed()
}

pub(super) fn arb_rule(segment_idx: usize) -> BoxedStrategy<String> {
    prop_oneof![
        2 => arb_atom(segment_idx),
        1 => (arb_atom(segment_idx), arb_atom(segment_idx)).prop_map(|(a, b)| format!("{a} and {b}")),
        1 => (arb_atom(segment_idx), arb_atom(segment_idx)).prop_map(|(a, b)| format!("{a} or not ({b})")),
    ]
    .boxed()
}

/// (customer, kind, time step, message id, value, key, late-if-0)
pub(super) type RawEvent = (u8, u8, i64, Option<u8>, Option<f64>, u8, u8);

fn arb_event() -> impl Strategy<Value = RawEvent> {
    (
        0u8..3,
        0u8..4,
        0i64..120,
        proptest::option::of(0u8..6),
        proptest::option::of(0.0f64..10.0),
        0u8..3,
        0u8..10,
    )
}

pub(super) fn build_events(raw: &[RawEvent]) -> Vec<Event> {
    let mut clock = 0i64;
    raw.iter()
        .map(|&(customer, kind, step, message, value, key, late)| {
            clock += step;
            let ts = if late == 0 {
                (clock - 150).max(0)
            } else {
                clock
            };
            let customer = format!("c{customer}");
            let message_id = message.map(|m| format!("m{m}"));
            match kind {
                3 => {
                    let traits = if key == 0 {
                        json!({"t": value.map(|v| v.floor()), "s": "p"})
                    } else {
                        json!({"s": "q", "t": 3})
                    };
                    let mut event = identify(&customer, ts, traits);
                    event.message_id = message_id;
                    event
                }
                _ => {
                    let name = ["A", "B", "page"][usize::from(kind)];
                    let mut props = Map::new();
                    if let Some(v) = value {
                        props.insert("v".into(), json!(v.floor()));
                    }
                    props.insert("k".into(), json!(["x", "y", "z"][usize::from(key)]));
                    track(
                        &customer,
                        name,
                        ts,
                        message_id.as_deref(),
                        Value::Object(props),
                    )
                }
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn engine_agrees_with_the_naive_reference(
        rules in (arb_rule(0), arb_rule(1), arb_rule(2)),
        raw in proptest::collection::vec(arb_event(), 1..40),
        tail in 0i64..1500,
    ) {
        let texts = [rules.0, rules.1, rules.2];
        let named: Vec<(String, &str)> = texts.iter().enumerate().map(|(i, r)| (format!("s{i}"), r.as_str())).collect();
        let pairs: Vec<(&str, &str)> = named.iter().map(|(id, r)| (id.as_str(), *r)).collect();
        let program = program(&pairs);
        let events = build_events(&raw);
        let until = events.iter().map(|e| e.timestamp).max().map(|m| m + tail);
        let engine_rows = rows(&run_engine(program.clone(), &events, until));
        let reference = Reference {
            segments: named.iter().map(|(id, r)| (id.clone(), parse(r).expect("parses"))).collect(),
            order: &program.eval_order,
        };
        let expected = reference.run(&events, until, 1000);
        prop_assert_eq!(engine_rows, expected, "rules: {:#?}", texts);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// The same with a one-timer window and a write-back after every event: timers are cut
    /// back to the store and read from it again all the time.
    #[test]
    fn engine_with_a_one_timer_window_agrees_with_the_naive_reference(
        rules in (arb_rule(0), arb_rule(1), arb_rule(2)),
        raw in proptest::collection::vec(arb_event(), 1..40),
        tail in 0i64..1500,
    ) {
        let texts = [rules.0, rules.1, rules.2];
        let named: Vec<(String, &str)> = texts.iter().enumerate().map(|(i, r)| (format!("s{i}"), r.as_str())).collect();
        let pairs: Vec<(&str, &str)> = named.iter().map(|(id, r)| (id.as_str(), *r)).collect();
        let program = program(&pairs);
        let events = build_events(&raw);
        let until = events.iter().map(|e| e.timestamp).max().map(|m| m + tail);
        let config = EngineConfig { timer_window: 1, ..test_config() };
        let engine_rows = rows(&run_engine_with(program.clone(), &events, until, config, true));
        let reference = Reference {
            segments: named.iter().map(|(id, r)| (id.clone(), parse(r).expect("parses"))).collect(),
            order: &program.eval_order,
        };
        let expected = reference.run(&events, until, 1000);
        prop_assert_eq!(engine_rows, expected, "rules: {:#?}", texts);
    }
}

/// A stored state whose layout id matches but whose slot vectors are short (corrupt, or written
/// by a buggy build) is a clear error naming partition and customer, not a panic of the worker
/// and not a silently empty state.
#[test]
fn a_corrupt_stored_state_is_an_error_naming_partition_and_customer() {
    let program = program(&[(
        "buyer",
        r#"count("Order", 7d) >= 1 and trait.plan == "pro""#,
    )]);
    let layout = codec::StateLayout::of(&program);
    let store = Arc::new(MemoryStore::default());
    let short = codec::encode(&crate::features::CustomerState::default(), &layout);
    let mut writes = WriteSet::default();
    writes.put(Table::Customers, keys::customer(7, "c-1"), short);
    let garbage = vec![1, 0xff, 0xff, 0xff];
    writes.put(Table::Customers, keys::customer(7, "c-2"), garbage);
    store.write(writes).expect("write");
    let mut engine = PartitionEngine::open(7, program, store, test_config()).expect("open");
    let mut changes = Vec::new();
    for customer in ["c-1", "c-2"] {
        let event = track(customer, "Order", 1_000, None, json!({}));
        match engine.apply_event(&event, &mut changes) {
            Err(EngineError::CorruptState {
                partition,
                customer: named,
                reason,
            }) => {
                assert_eq!((partition, named.as_str()), (7, customer), "{reason}");
                let message = EngineError::CorruptState {
                    partition,
                    customer: named,
                    reason,
                }
                .to_string();
                assert!(message.starts_with("partition 7: customer \""), "{message}");
            }
            other => panic!("{customer}: expected a corrupt-state error, got {other:?}"),
        }
    }
    assert!(changes.is_empty());
}

/// Timer keys and the clock are read back when a partition opens: one that does not parse is
/// a refusal naming the partition (a timer skipped silently is a customer never re-evaluated).
#[test]
fn a_corrupt_timer_key_or_clock_refuses_to_open_the_partition() {
    let program = program(&[("buyer", r#"count("Order", 7d) >= 1"#)]);
    let store = Arc::new(MemoryStore::default());
    let mut writes = WriteSet::default();
    writes.put(Table::Timers, vec![0, 0, 0, 3, 1, 2], Vec::new());
    store.write(writes).expect("write");
    let opened = PartitionEngine::open(3, program.clone(), store, test_config());
    let message = opened.err().map(|err| err.to_string()).unwrap_or_default();
    assert!(message.contains("timer of partition 3"), "{message}");

    let store = Arc::new(MemoryStore::default());
    let mut writes = WriteSet::default();
    writes.put(Table::Meta, keys::clock(4), vec![1, 2, 3]);
    store.write(writes).expect("write");
    let opened = PartitionEngine::open(4, program, store, test_config());
    let message = opened.err().map(|err| err.to_string()).unwrap_or_default();
    assert!(
        message.contains("clock of partition 4") && message.contains("expected 8 bytes, found 3"),
        "{message}"
    );
}
