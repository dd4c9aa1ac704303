//! The rule language (SPEC §3): lexer, parser, type-checker/compiler and evaluator.
//!
//! Pure and synchronous: nothing here knows about Kafka, RocksDB or tokio.

pub mod ast;
pub mod compile;
pub mod error;
pub mod eval;
pub mod explain;
pub mod lexer;
pub mod parser;
pub mod program;

pub use compile::{compile, SegmentDef, SegmentError};
pub use error::{RuleError, Span};
pub use eval::{evaluate, evaluate_dirty, next_change, Evaluation};
pub use explain::{explain, ExplainNode, Explanation};
pub use program::Program;

/// Compiles `(id, rule)` pairs, panicking with the errors: the unit tests' shorthand.
#[cfg(test)]
pub(crate) fn compile_rules(rules: &[(&str, &str)]) -> Program {
    let defs: Vec<SegmentDef> = rules
        .iter()
        .map(|(id, rule)| SegmentDef {
            id: (*id).into(),
            description: None,
            rule: (*rule).into(),
        })
        .collect();
    compile(&defs).unwrap_or_else(|errors| panic!("{rules:?}: {errors:?}"))
}
