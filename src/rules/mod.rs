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
