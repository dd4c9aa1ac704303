//! The compiled form of the segment definitions: typed expression trees over feature slots, and the
//! feature layout — exactly the per-customer aggregates the rules need, nothing more.

use super::ast::{AggFunc, BinOp, Condition, Expr};

/// A constant known at compile time.
#[derive(Debug, Clone, PartialEq)]
pub enum Const {
    Null,
    Bool(bool),
    Num(f64),
    Dur(f64),
    /// A time in ms; `never` is `-inf`.
    Time(f64),
    Str(String),
}

/// Where a count or aggregate reads its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// All-time running totals.
    Total(usize),
    /// The per-event entries of a series, restricted to `(now - window, now]`.
    Window { series: usize, window: i64 },
}

/// A type-checked expression whose aggregates point at feature slots.
#[derive(Debug, Clone, PartialEq)]
pub enum CExpr {
    Const(Const),
    /// `slot` is the stored top-level trait; `path` descends into it (empty for a plain trait).
    Trait {
        slot: usize,
        path: Vec<String>,
    },
    Count(Source),
    Aggregate {
        func: AggFunc,
        source: Source,
    },
    Last(usize),
    First(usize),
    Since(Box<CExpr>),
    InSegment(usize),
    Bucket(u64),
    Not(Box<CExpr>),
    Neg(Box<CExpr>),
    And(Box<CExpr>, Box<CExpr>),
    Or(Box<CExpr>, Box<CExpr>),
    /// `+ - * /`.
    Arith(BinOp, Box<CExpr>, Box<CExpr>),
    /// `== != < <= > >=`.
    Compare(BinOp, Box<CExpr>, Box<CExpr>),
    In(Box<CExpr>, Vec<CExpr>),
    IsNull {
        expr: Box<CExpr>,
        negated: bool,
    },
}

/// A compiled event filter: name (`None` = any activity) and `where` conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct CMatcher {
    pub event: Option<String>,
    /// The `where` conditions, as parsed (they need no further compilation).
    pub conditions: Vec<Condition>,
    /// Canonical text, e.g. `"Order Completed" where currency == "EUR"`.
    pub text: String,
}

/// Per-event entries kept for windowed aggregates over one matcher (and property).
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesSpec {
    pub matcher: usize,
    pub property: Option<Vec<String>>,
    /// The longest window any rule reads from this series; older entries are dropped.
    pub retention: i64,
}

/// All-time totals (count, sum, min, max) over one matcher (and property).
#[derive(Debug, Clone, PartialEq)]
pub struct TotalSpec {
    pub matcher: usize,
    pub property: Option<Vec<String>>,
}

/// Everything stored per customer, derived from the rules.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FeatureLayout {
    pub matchers: Vec<CMatcher>,
    pub series: Vec<SeriesSpec>,
    pub totals: Vec<TotalSpec>,
    /// Matchers whose first/last event time is needed.
    pub extremes: Vec<usize>,
    /// Top-level trait keys read by the rules.
    pub traits: Vec<String>,
}

impl FeatureLayout {
    /// Every top-level event property any rule reads (in `where` or as an aggregated value):
    /// the decoder can skip the others.
    pub fn property_keys(&self) -> Vec<String> {
        let conditions = self
            .matchers
            .iter()
            .flat_map(|m| &m.conditions)
            .map(|c| match c {
                Condition::Compare { path, .. }
                | Condition::In { path, .. }
                | Condition::IsNull { path, .. } => path,
            });
        let values = self
            .series
            .iter()
            .filter_map(|s| s.property.as_ref())
            .chain(self.totals.iter().filter_map(|t| t.property.as_ref()));
        let mut keys: Vec<String> = conditions
            .chain(values)
            .filter_map(|path| path.first().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Stable names of every stored feature, in slot order; two layouts with equal descriptors
    /// store the same thing in the same place. Used to carry state across definition changes.
    pub fn descriptors(&self) -> FeatureDescriptors {
        let property = |prop: &Option<Vec<String>>| match prop {
            Some(path) => format!("{:?}", path.join(".")),
            None => "-".to_string(),
        };
        FeatureDescriptors {
            series: self
                .series
                .iter()
                .map(|spec| {
                    format!(
                        "{}|{}",
                        self.matchers[spec.matcher].text,
                        property(&spec.property)
                    )
                })
                .collect(),
            totals: self
                .totals
                .iter()
                .map(|spec| {
                    format!(
                        "{}|{}",
                        self.matchers[spec.matcher].text,
                        property(&spec.property)
                    )
                })
                .collect(),
            extremes: self
                .extremes
                .iter()
                .map(|matcher| self.matchers[*matcher].text.clone())
                .collect(),
            traits: self.traits.clone(),
        }
    }
}

/// Feature names by kind, in slot order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeatureDescriptors {
    pub series: Vec<String>,
    pub totals: Vec<String>,
    pub extremes: Vec<String>,
    pub traits: Vec<String>,
}

/// One compiled segment.
#[derive(Debug, Clone)]
pub struct CompiledSegment {
    pub id: String,
    pub description: Option<String>,
    pub rule_text: String,
    /// Canonical rule text (normalised spacing and parentheses).
    pub canonical: String,
    /// The parsed rule, for explanations (its and/or/not/comparison structure matches `expr`).
    pub ast: Expr,
    /// Hash of the canonical rule and the versions of the segments it reads.
    pub version: String,
    pub expr: CExpr,
    /// Indexes of the segments named by `in_segment`.
    pub depends_on: Vec<usize>,
    /// True if the rule's value can change with time alone (windows, `since`).
    pub time_dependent: bool,
    /// Segments whose rules name this one in `in_segment`.
    pub dependents: Vec<usize>,
}

/// All segments, compiled together.
#[derive(Debug, Clone)]
pub struct Program {
    /// In definition order; change events of one evaluation are emitted in this order.
    pub segments: Vec<CompiledSegment>,
    /// Segment indexes with every dependency before its dependents.
    pub eval_order: Vec<usize>,
    pub layout: FeatureLayout,
    /// Hash of every segment version: identifies this set of definitions.
    pub version: String,
    /// Per matcher, the segments whose value can depend on it (directly or via `in_segment`).
    pub matcher_readers: Vec<Vec<usize>>,
    /// Per stored trait, the segments whose value can depend on it.
    pub trait_readers: Vec<Vec<usize>>,
}

impl Program {
    pub fn segment_index(&self, id: &str) -> Option<usize> {
        self.segments.iter().position(|segment| segment.id == id)
    }
}
