//! Tokens of the rule language, with byte spans into the rule text.

use super::error::{RuleError, Span};

#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    Ident(String),
    Str(String),
    Number(f64),
    /// A whole number with a unit, in milliseconds.
    Duration(i64),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Plus,
    Minus,
    Star,
    Slash,
    End,
}

impl Token {
    /// How the token reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Token::Ident(name) => format!("'{name}'"),
            Token::Str(text) => format!("string {text:?}"),
            Token::Number(number) => format!("number {number}"),
            Token::Duration(_) => "a duration".into(),
            Token::End => "the end of the rule".into(),
            other => format!("'{}'", other.symbol()),
        }
    }

    fn symbol(&self) -> &'static str {
        match self {
            Token::LParen => "(",
            Token::RParen => ")",
            Token::LBracket => "[",
            Token::RBracket => "]",
            Token::Comma => ",",
            Token::Dot => ".",
            Token::Eq => "==",
            Token::Ne => "!=",
            Token::Lt => "<",
            Token::Le => "<=",
            Token::Gt => ">",
            Token::Ge => ">=",
            Token::Plus => "+",
            Token::Minus => "-",
            Token::Star => "*",
            Token::Slash => "/",
            _ => "?",
        }
    }
}

/// Splits rule text into tokens; the last one is always `Token::End`.
pub fn tokenize(text: &str) -> Result<Vec<(Token, Span)>, RuleError> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let byte = bytes[pos];
        let start = pos;
        if byte.is_ascii_whitespace() {
            pos += 1;
            continue;
        }
        if byte == b'#' {
            while pos < bytes.len() && bytes[pos] != b'\n' {
                pos += 1;
            }
            continue;
        }
        if byte.is_ascii_alphabetic() || byte == b'_' {
            while pos < bytes.len() && (bytes[pos].is_ascii_alphanumeric() || bytes[pos] == b'_') {
                pos += 1;
            }
            tokens.push((
                Token::Ident(text[start..pos].to_string()),
                Span::new(start, pos),
            ));
            continue;
        }
        if byte.is_ascii_digit() {
            let (token, end) = number_or_duration(text, start)?;
            tokens.push((token, Span::new(start, end)));
            pos = end;
            continue;
        }
        if byte == b'"' || byte == b'\'' {
            let (value, end) = string_literal(text, start)?;
            tokens.push((Token::Str(value), Span::new(start, end)));
            pos = end;
            continue;
        }
        let two = bytes.get(pos..pos + 2);
        let (token, len) = match (byte, two) {
            (_, Some(b"==")) => (Token::Eq, 2),
            (_, Some(b"!=")) => (Token::Ne, 2),
            (_, Some(b"<=")) => (Token::Le, 2),
            (_, Some(b">=")) => (Token::Ge, 2),
            (b'<', _) => (Token::Lt, 1),
            (b'>', _) => (Token::Gt, 1),
            (b'(', _) => (Token::LParen, 1),
            (b')', _) => (Token::RParen, 1),
            (b'[', _) => (Token::LBracket, 1),
            (b']', _) => (Token::RBracket, 1),
            (b',', _) => (Token::Comma, 1),
            (b'.', _) => (Token::Dot, 1),
            (b'+', _) => (Token::Plus, 1),
            (b'-', _) => (Token::Minus, 1),
            (b'*', _) => (Token::Star, 1),
            (b'/', _) => (Token::Slash, 1),
            (b'=', _) => {
                return Err(RuleError::new(
                    Span::new(start, start + 1),
                    "'=' is not an operator; compare with '=='",
                ))
            }
            _ => {
                let ch = text[start..].chars().next().unwrap_or('?');
                return Err(RuleError::new(
                    Span::new(start, start + ch.len_utf8()),
                    format!("unexpected character {ch:?}"),
                ));
            }
        };
        tokens.push((token, Span::new(start, start + len)));
        pos += len;
    }
    tokens.push((Token::End, Span::new(text.len(), text.len())));
    Ok(tokens)
}

fn number_or_duration(text: &str, start: usize) -> Result<(Token, usize), RuleError> {
    let bytes = text.as_bytes();
    let mut pos = start;
    while pos < bytes.len() && bytes[pos].is_ascii_digit() {
        pos += 1;
    }
    let mut is_fraction = false;
    if pos + 1 < bytes.len() && bytes[pos] == b'.' && bytes[pos + 1].is_ascii_digit() {
        is_fraction = true;
        pos += 1;
        while pos < bytes.len() && bytes[pos].is_ascii_digit() {
            pos += 1;
        }
    }
    let digits_end = pos;
    while pos < bytes.len() && (bytes[pos].is_ascii_alphanumeric() || bytes[pos] == b'_') {
        pos += 1;
    }
    let digits = &text[start..digits_end];
    let unit = &text[digits_end..pos];
    let span = Span::new(start, pos);
    if unit.is_empty() {
        let number = digits
            .parse::<f64>()
            .map_err(|_| RuleError::new(span, format!("bad number {digits:?}")))?;
        return Ok((Token::Number(number), pos));
    }
    let Some(unit_ms) = crate::model::time::duration_unit(unit) else {
        return Err(RuleError::new(
            span,
            format!(
                "bad duration unit {unit:?} in {:?}: use ms, s, m, h, d or w",
                &text[start..pos]
            ),
        ));
    };
    if is_fraction {
        return Err(RuleError::new(
            span,
            "a duration must be a whole number of its unit (write 90m, not 1.5h)",
        ));
    }
    let millis = digits
        .parse::<i64>()
        .ok()
        .and_then(|count| count.checked_mul(unit_ms))
        .filter(|millis| *millis <= 1_000 * 365 * 86_400_000)
        .ok_or_else(|| RuleError::new(span, "duration is too long (at most 1000 years)"))?;
    Ok((Token::Duration(millis), pos))
}

fn string_literal(text: &str, start: usize) -> Result<(String, usize), RuleError> {
    let quote = text.as_bytes()[start] as char;
    let mut value = String::new();
    let mut chars = text[start + 1..].char_indices();
    while let Some((offset, ch)) = chars.next() {
        let pos = start + 1 + offset;
        match ch {
            c if c == quote => return Ok((value, pos + 1)),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                Some((_, 'r')) => value.push('\r'),
                Some((_, '0')) => value.push('\0'),
                Some((_, 'u')) => value.push(unicode_escape(&mut chars, pos)?),
                Some((_, escaped)) => value.push(escaped),
                None => break,
            },
            other => value.push(other),
        }
    }
    Err(RuleError::new(
        Span::new(start, text.len()),
        "string is not closed",
    ))
}

/// The `{HEX}` after `\\u` (1 to 6 hex digits naming a Unicode scalar value): the escapes the
/// canonical text (Rust's `Debug` of a string) writes for characters it does not print.
fn unicode_escape(
    chars: &mut std::str::CharIndices<'_>,
    escape_at: usize,
) -> Result<char, RuleError> {
    let invalid = || {
        RuleError::new(
            Span::new(escape_at, escape_at + 2),
            "expected \\u{HEX} with 1 to 6 hex digits naming a character",
        )
    };
    if chars.next().map(|(_, ch)| ch) != Some('{') {
        return Err(invalid());
    }
    let mut code = 0u32;
    let mut digits = 0;
    loop {
        let (_, ch) = chars.next().ok_or_else(invalid)?;
        if ch == '}' {
            break;
        }
        let digit = ch.to_digit(16).ok_or_else(invalid)?;
        digits += 1;
        if digits > 6 {
            return Err(invalid());
        }
        code = code * 16 + digit;
    }
    if digits == 0 {
        return Err(invalid());
    }
    char::from_u32(code).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<Token> {
        tokenize(text)
            .expect("tokenizes")
            .into_iter()
            .map(|(token, _)| token)
            .collect()
    }

    #[test]
    fn durations_numbers_and_operators() {
        assert_eq!(
            kinds(r#"count("A", 7d) >= 2.5"#),
            vec![
                Token::Ident("count".into()),
                Token::LParen,
                Token::Str("A".into()),
                Token::Comma,
                Token::Duration(604_800_000),
                Token::RParen,
                Token::Ge,
                Token::Number(2.5),
                Token::End
            ]
        );
        assert_eq!(
            kinds("90s 15m 1h 4w 250ms")[..5],
            [
                Token::Duration(90_000),
                Token::Duration(900_000),
                Token::Duration(3_600_000),
                Token::Duration(2_419_200_000),
                Token::Duration(250)
            ]
        );
    }

    #[test]
    fn bad_unit_points_at_the_literal() {
        let err = tokenize("count(\"A\", 5x) > 1").expect_err("bad unit");
        assert_eq!(err.span, Span::new(11, 13));
        assert!(err.message.contains("bad duration unit"), "{}", err.message);
    }

    #[test]
    fn unclosed_string() {
        assert!(tokenize("last(\"A) > 1").is_err());
    }

    /// The canonical text writes strings as Rust's `Debug` does (`\0`, `\r`, `\u{7f}`, …);
    /// the lexer reads every such escape back to the same string (the rules fuzz target found
    /// `"E[\0il"` read back as `"E[0il"`).
    #[test]
    fn debug_escaped_strings_read_back_unchanged() {
        for original in [
            "E[\0il Opened",
            "tab\tnew\nline\rcr",
            "quote \" and backslash \\ and 'single'",
            "\u{7f}\u{1b}[0m\u{200b}\u{301}e\u{feff}",
            "emoji \u{1f600} and é",
        ] {
            let written = format!("{original:?}");
            let tokens = kinds(&written);
            assert_eq!(tokens[0], Token::Str(original.to_string()), "{written}");
        }
        for bad in [
            r#""\u""#,
            r#""\u{}""#,
            r#""\u{110000}""#,
            r#""\u{1234567}""#,
            r#""\u{zz}""#,
        ] {
            assert!(tokenize(bad).is_err(), "{bad}");
        }
    }
}
