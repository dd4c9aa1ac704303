//! Rule errors: a byte span in the rule text and a plain-words message.

/// Byte offsets `[start, end)` into a rule's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }

    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// Something wrong with one rule, located in its text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RuleError {
    pub span: Span,
    pub message: String,
}

impl RuleError {
    pub fn new(span: Span, message: impl Into<String>) -> Self {
        RuleError {
            span,
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let clamped = offset.min(text.len());
    let before = text.get(..clamped).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |idx| idx + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}
