//! The parsed (not yet type-checked) form of a rule. `Display` prints a canonical text, used for
//! segment versions and feature descriptors.

use std::fmt;

use super::error::Span;

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
    /// Levels in this tree, a leaf being 1. The parser keeps it at most
    /// [`super::parser::MAX_DEPTH`], which bounds every recursion over the tree (compile,
    /// eval, explain, `Display`, drop).
    pub depth: u32,
}

impl ExprKind {
    /// The depth of a node of this kind over its (already built) children.
    pub fn depth(&self) -> u32 {
        let children = match self {
            ExprKind::Since(inner)
            | ExprKind::Not(inner)
            | ExprKind::Neg(inner)
            | ExprKind::IsNull { expr: inner, .. } => inner.depth,
            ExprKind::Binary { lhs, rhs, .. } => lhs.depth.max(rhs.depth),
            ExprKind::In { expr, list } => list
                .iter()
                .map(|item| item.depth)
                .fold(expr.depth, u32::max),
            _ => 0,
        };
        children.saturating_add(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFunc {
    Sum,
    Avg,
    Min,
    Max,
}

impl AggFunc {
    pub fn name(self) -> &'static str {
        match self {
            AggFunc::Sum => "sum",
            AggFunc::Avg => "avg",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    And,
    Or,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::And => "and",
            BinOp::Or => "or",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }

    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
        )
    }
}

/// A literal value inside a `where` condition or an `in` list.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Number(f64),
    Str(String),
    Bool(bool),
}

/// One `PROP OP VALUE` test inside `where`.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Compare {
        path: Vec<String>,
        op: BinOp,
        value: Literal,
    },
    In {
        path: Vec<String>,
        values: Vec<Literal>,
    },
    IsNull {
        path: Vec<String>,
        negated: bool,
    },
}

/// Which events an aggregate looks at: `any` or a name, optionally filtered by `where`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher {
    /// `None` is `any` (every activity event).
    pub event: Option<String>,
    pub conditions: Vec<Condition>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Number(f64),
    Str(String),
    Bool(bool),
    Duration(i64),
    Never,
    Null,
    Trait(Vec<String>),
    Count {
        matcher: Matcher,
        window: Option<i64>,
    },
    Aggregate {
        func: AggFunc,
        matcher: Matcher,
        property: Vec<String>,
        window: Option<i64>,
    },
    Last(Matcher),
    First(Matcher),
    Since(Box<Expr>),
    InSegment(String),
    Bucket(u64),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    In {
        expr: Box<Expr>,
        list: Vec<Expr>,
    },
    IsNull {
        expr: Box<Expr>,
        negated: bool,
    },
}

fn write_path(f: &mut fmt::Formatter<'_>, path: &[String]) -> fmt::Result {
    if path.len() == 1 && is_plain_ident(&path[0]) {
        return write!(f, "{}", path[0]);
    }
    if path.iter().all(|part| is_plain_ident(part)) {
        return write!(f, "{}", path.join("."));
    }
    write!(f, "{:?}", path.join("."))
}

fn is_plain_ident(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Number(number) => write!(f, "{number}"),
            Literal::Str(text) => write!(f, "{text:?}"),
            Literal::Bool(flag) => write!(f, "{flag}"),
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Compare { path, op, value } => {
                write_path(f, path)?;
                write!(f, " {} {value}", op.symbol())
            }
            Condition::In { path, values } => {
                write_path(f, path)?;
                let items: Vec<String> = values.iter().map(ToString::to_string).collect();
                write!(f, " in [{}]", items.join(", "))
            }
            Condition::IsNull { path, negated } => {
                write_path(f, path)?;
                write!(f, " is {}null", if *negated { "not " } else { "" })
            }
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.event {
            None => write!(f, "any")?,
            Some(name) => write!(f, "{name:?}")?,
        }
        for (idx, condition) in self.conditions.iter().enumerate() {
            let joiner = if idx == 0 { " where " } else { " and " };
            write!(f, "{joiner}{condition}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::model::time::format_duration;
        match &self.kind {
            ExprKind::Number(number) => write!(f, "{number}"),
            ExprKind::Str(text) => write!(f, "{text:?}"),
            ExprKind::Bool(flag) => write!(f, "{flag}"),
            ExprKind::Duration(millis) => write!(f, "{}", format_duration(*millis)),
            ExprKind::Never => write!(f, "never"),
            ExprKind::Null => write!(f, "null"),
            ExprKind::Trait(path) => write!(f, "trait.{}", path.join(".")),
            ExprKind::Count { matcher, window } => match window {
                Some(window) => write!(f, "count({matcher}, {})", format_duration(*window)),
                None => write!(f, "count({matcher})"),
            },
            ExprKind::Aggregate {
                func,
                matcher,
                property,
                window,
            } => {
                write!(f, "{}({matcher}, {:?}", func.name(), property.join("."))?;
                if let Some(window) = window {
                    write!(f, ", {}", format_duration(*window))?;
                }
                write!(f, ")")
            }
            ExprKind::Last(matcher) => write!(f, "last({matcher})"),
            ExprKind::First(matcher) => write!(f, "first({matcher})"),
            ExprKind::Since(inner) => write!(f, "since({inner})"),
            ExprKind::InSegment(id) => write!(f, "in_segment({id:?})"),
            ExprKind::Bucket(n) => write!(f, "bucket({n})"),
            ExprKind::Not(inner) => write!(f, "(not {inner})"),
            ExprKind::Neg(inner) => write!(f, "(-{inner})"),
            ExprKind::Binary { op, lhs, rhs } => write!(f, "({lhs} {} {rhs})", op.symbol()),
            ExprKind::In { expr, list } => {
                let items: Vec<String> = list.iter().map(ToString::to_string).collect();
                write!(f, "({expr} in [{}])", items.join(", "))
            }
            ExprKind::IsNull { expr, negated } => {
                write!(f, "({expr} is {}null)", if *negated { "not " } else { "" })
            }
        }
    }
}
