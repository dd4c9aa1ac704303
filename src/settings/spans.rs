//! Mapping a byte offset inside a rule string back to the config file, through TOML quoting
//! and escapes, so rule errors point at the right line and column.

use std::ops::Range;

/// The file offset of byte `offset` of the decoded string whose TOML literal spans `span`.
pub fn rule_offset(text: &str, span: Range<usize>, offset: usize) -> usize {
    let Some(literal) = text.get(span.clone()) else {
        return span.start;
    };
    let (quote, literal_string) = if literal.starts_with("'''") {
        ("'''", true)
    } else if literal.starts_with("\"\"\"") {
        ("\"\"\"", false)
    } else if literal.starts_with('\'') {
        ("'", true)
    } else if literal.starts_with('"') {
        ("\"", false)
    } else {
        return span.start;
    };
    let mut body_start = span.start + quote.len();
    if quote.len() == 3 {
        if text[body_start..].starts_with("\r\n") {
            body_start += 2;
        } else if text[body_start..].starts_with('\n') {
            body_start += 1;
        }
    }
    if literal_string {
        return body_start + offset;
    }
    // Basic string: walk the raw text, decoding escapes, until `offset` decoded bytes are behind.
    let raw = &text[body_start..span.end];
    let mut decoded = 0usize;
    let mut chars = raw.char_indices().peekable();
    while let Some((idx, ch)) = chars.next() {
        if decoded >= offset {
            return body_start + idx;
        }
        if ch != '\\' {
            decoded += ch.len_utf8();
            continue;
        }
        match chars.next() {
            Some((_, 'u')) => {
                for _ in 0..4 {
                    chars.next();
                }
                decoded += 1;
            }
            Some((_, 'U')) => {
                for _ in 0..8 {
                    chars.next();
                }
                decoded += 1;
            }
            Some((_, c)) if c.is_whitespace() => {
                while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
                    chars.next();
                }
            }
            Some(_) => decoded += 1,
            None => break,
        }
    }
    span.end.saturating_sub(quote.len())
}
