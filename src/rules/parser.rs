//! Recursive-descent parser: tokens → [`Expr`].
//!
//! Precedence, loosest first: `or`, `and`, `not`, comparisons / `in` / `is null`, `+ -`, `* /`,
//! unary `-`. Event matchers (`any`, `"Name" where ...`) appear only as function arguments.

use super::ast::{AggFunc, BinOp, Condition, Expr, ExprKind, Literal, Matcher};
use super::error::{RuleError, Span};
use super::lexer::{tokenize, Token};

const FUNCTIONS: &str = "count, sum, avg, min, max, last, first, since, in_segment, bucket";

/// The deepest a rule's tree may be: `not`, `-`, `since(...)`, `in`, comparisons and each
/// operator of a chain such as `a or b or c` count one level. The recursions over the tree
/// (compile, eval, explain, `Display`, drop) take up to ~1.5 KiB of stack per level in release
/// builds (measured), so this is at most ~400 KiB — a fifth of a tokio worker's 2 MiB.
pub const MAX_DEPTH: u32 = 256;

/// The deepest the parser itself may recurse: each parenthesis, `not`, `-` and `since(` is a
/// level (a chain of operators is parsed in a loop and costs none). A level of parentheses takes
/// ~5 KiB of parser stack (measured, release), so this is at most ~500 KiB. The canonical text
/// of a deep tree (fully parenthesised) can exceed it and is then refused like any other.
pub const MAX_NESTING: u32 = 100;

/// Parses one rule.
pub fn parse(text: &str) -> Result<Expr, RuleError> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        nesting: 0,
    };
    let expr = parser.expr()?;
    let (token, span) = parser.peek();
    if *token != Token::End {
        return Err(RuleError::new(
            span,
            format!("expected the rule to end here, found {}", token.describe()),
        ));
    }
    Ok(expr)
}

struct Parser {
    tokens: Vec<(Token, Span)>,
    pos: usize,
    /// How many nested sub-expressions the parser is inside (its own recursion depth, in
    /// levels); kept at most [`MAX_NESTING`].
    nesting: u32,
}

fn too_deep(span: Span) -> RuleError {
    RuleError::new(
        span,
        format!(
            "the rule is nested too deeply: at most {MAX_NESTING} levels of parentheses, \
             not, - and since, and {MAX_DEPTH} levels of operators in all"
        ),
    )
}

/// A node over already-built children; an error if that makes the tree deeper than
/// [`MAX_DEPTH`] (located at `at`, where the extra level starts).
fn node(kind: ExprKind, span: Span, at: Span) -> Result<Expr, RuleError> {
    let depth = kind.depth();
    if depth > MAX_DEPTH {
        return Err(too_deep(at));
    }
    Ok(Expr { kind, span, depth })
}

impl Parser {
    fn peek(&self) -> (&Token, Span) {
        let (token, span) = &self.tokens[self.pos.min(self.tokens.len() - 1)];
        (token, *span)
    }

    fn next(&mut self) -> (Token, Span) {
        let (token, span) = self.peek();
        let owned = (token.clone(), span);
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        owned
    }

    fn is_keyword(&self, word: &str) -> bool {
        matches!(self.peek().0, Token::Ident(name) if name == word)
    }

    fn eat_keyword(&mut self, word: &str) -> bool {
        let found = self.is_keyword(word);
        if found {
            self.pos += 1;
        }
        found
    }

    fn expect(&mut self, expected: Token, what: &str) -> Result<Span, RuleError> {
        let (token, span) = self.next();
        if token == expected {
            return Ok(span);
        }
        Err(RuleError::new(
            span,
            format!("expected {what}, found {}", token.describe()),
        ))
    }

    fn expr(&mut self) -> Result<Expr, RuleError> {
        self.nested(Self::or)
    }

    /// Runs `parse` one level deeper, refusing to go past [`MAX_NESTING`] (this recursion is
    /// what overflowed the stack on `((((…`).
    fn nested(
        &mut self,
        parse: impl FnOnce(&mut Self) -> Result<Expr, RuleError>,
    ) -> Result<Expr, RuleError> {
        if self.nesting >= MAX_NESTING {
            return Err(too_deep(self.peek().1));
        }
        self.nesting += 1;
        let parsed = parse(self);
        self.nesting -= 1;
        parsed
    }

    fn or(&mut self) -> Result<Expr, RuleError> {
        let mut lhs = self.and()?;
        while self.eat_keyword("or") {
            let rhs = self.and()?;
            lhs = binary(BinOp::Or, lhs, rhs)?;
        }
        Ok(lhs)
    }

    fn and(&mut self) -> Result<Expr, RuleError> {
        let mut lhs = self.not()?;
        while self.eat_keyword("and") {
            let rhs = self.not()?;
            lhs = binary(BinOp::And, lhs, rhs)?;
        }
        Ok(lhs)
    }

    fn not(&mut self) -> Result<Expr, RuleError> {
        let start = self.peek().1;
        if self.eat_keyword("not") {
            let inner = self.nested(Self::not)?;
            let span = start.to(inner.span);
            return node(ExprKind::Not(Box::new(inner)), span, start);
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, RuleError> {
        let lhs = self.additive()?;
        let (token, span) = self.peek();
        let op = match token {
            Token::Eq => BinOp::Eq,
            Token::Ne => BinOp::Ne,
            Token::Lt => BinOp::Lt,
            Token::Le => BinOp::Le,
            Token::Gt => BinOp::Gt,
            Token::Ge => BinOp::Ge,
            Token::Ident(word) if word == "in" => {
                self.pos += 1;
                let (list, list_span) = self.expr_list()?;
                let whole = lhs.span.to(list_span);
                let kind = ExprKind::In {
                    expr: Box::new(lhs),
                    list,
                };
                return self.no_chained_comparison(node(kind, whole, span)?);
            }
            Token::Ident(word) if word == "is" => {
                self.pos += 1;
                let negated = self.eat_keyword("not");
                let null_span = self.peek().1;
                if !self.eat_keyword("null") {
                    return Err(RuleError::new(null_span, "expected 'null' after 'is'"));
                }
                let whole = lhs.span.to(null_span);
                let kind = ExprKind::IsNull {
                    expr: Box::new(lhs),
                    negated,
                };
                return self.no_chained_comparison(node(kind, whole, span)?);
            }
            _ => return Ok(lhs),
        };
        let _ = span;
        self.pos += 1;
        let rhs = self.additive()?;
        self.no_chained_comparison(binary(op, lhs, rhs)?)
    }

    fn no_chained_comparison(&self, expr: Expr) -> Result<Expr, RuleError> {
        let (token, span) = self.peek();
        let chained = matches!(
            token,
            Token::Eq | Token::Ne | Token::Lt | Token::Le | Token::Gt | Token::Ge
        ) || matches!(token, Token::Ident(word) if word == "in" || word == "is");
        if chained {
            return Err(RuleError::new(
                span,
                "comparisons cannot be chained; join them with 'and'",
            ));
        }
        Ok(expr)
    }

    fn additive(&mut self) -> Result<Expr, RuleError> {
        let mut lhs = self.multiplicative()?;
        loop {
            let op = match self.peek().0 {
                Token::Plus => BinOp::Add,
                Token::Minus => BinOp::Sub,
                _ => return Ok(lhs),
            };
            self.pos += 1;
            let rhs = self.multiplicative()?;
            lhs = binary(op, lhs, rhs)?;
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, RuleError> {
        let mut lhs = self.unary()?;
        loop {
            let op = match self.peek().0 {
                Token::Star => BinOp::Mul,
                Token::Slash => BinOp::Div,
                _ => return Ok(lhs),
            };
            self.pos += 1;
            let rhs = self.unary()?;
            lhs = binary(op, lhs, rhs)?;
        }
    }

    fn unary(&mut self) -> Result<Expr, RuleError> {
        let (token, start) = self.peek();
        if *token == Token::Minus {
            self.pos += 1;
            let inner = self.nested(Self::unary)?;
            let span = start.to(inner.span);
            return node(ExprKind::Neg(Box::new(inner)), span, start);
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, RuleError> {
        let (token, span) = self.next();
        let kind = match token {
            Token::Number(number) => ExprKind::Number(number),
            Token::Str(text) => ExprKind::Str(text),
            Token::Duration(millis) => ExprKind::Duration(millis),
            Token::LParen => {
                let inner = self.expr()?;
                let close = self.expect(Token::RParen, "')'")?;
                return Ok(Expr {
                    span: span.to(close),
                    ..inner
                });
            }
            Token::Ident(word) => return self.word(word, span),
            other => {
                return Err(RuleError::new(
                    span,
                    format!("expected a value, found {}", other.describe()),
                ))
            }
        };
        node(kind, span, span)
    }

    fn word(&mut self, word: String, span: Span) -> Result<Expr, RuleError> {
        let simple = match word.as_str() {
            "true" => Some(ExprKind::Bool(true)),
            "false" => Some(ExprKind::Bool(false)),
            "never" => Some(ExprKind::Never),
            "null" => Some(ExprKind::Null),
            _ => None,
        };
        if let Some(kind) = simple {
            return node(kind, span, span);
        }
        if word == "trait" {
            self.expect(Token::Dot, "'.' and a trait name after 'trait'")?;
            let (path, path_span) = self.dotted_path()?;
            return node(ExprKind::Trait(path), span.to(path_span), span);
        }
        if *self.peek().0 != Token::LParen {
            let message = match word.as_str() {
                "any" => {
                    "'any' is an event matcher: use it inside count(...), last(...) and the like"
                        .to_string()
                }
                "and" | "or" | "in" | "is" | "where" => format!("'{word}' needs a value before it"),
                _ => format!("unknown name '{word}'"),
            };
            return Err(RuleError::new(span, message));
        }
        self.call(word, span)
    }

    fn call(&mut self, name: String, name_span: Span) -> Result<Expr, RuleError> {
        self.expect(Token::LParen, "'('")?;
        let kind = match name.as_str() {
            "count" => {
                let matcher = self.matcher()?;
                let window = self.optional_window()?;
                ExprKind::Count { matcher, window }
            }
            "sum" | "avg" | "min" | "max" => {
                let func = match name.as_str() {
                    "sum" => AggFunc::Sum,
                    "avg" => AggFunc::Avg,
                    "min" => AggFunc::Min,
                    _ => AggFunc::Max,
                };
                let matcher = self.matcher()?;
                self.expect(
                    Token::Comma,
                    &format!("',' and a property name: {name}(EVENT, \"property\")"),
                )?;
                let (token, span) = self.next();
                let Token::Str(property) = token else {
                    return Err(RuleError::new(
                        span,
                        format!(
                            "expected the property name as a string, found {}",
                            token.describe()
                        ),
                    ));
                };
                if property.is_empty() {
                    return Err(RuleError::new(span, "the property name is empty"));
                }
                let window = self.optional_window()?;
                ExprKind::Aggregate {
                    func,
                    matcher,
                    property: vec![property],
                    window,
                }
            }
            "last" => ExprKind::Last(self.matcher()?),
            "first" => ExprKind::First(self.matcher()?),
            "since" => ExprKind::Since(Box::new(self.expr()?)),
            "in_segment" => {
                let (token, span) = self.next();
                let Token::Str(id) = token else {
                    return Err(RuleError::new(
                        span,
                        format!(
                            "in_segment takes a segment id string, found {}",
                            token.describe()
                        ),
                    ));
                };
                ExprKind::InSegment(id)
            }
            "bucket" => {
                let (token, span) = self.next();
                match token {
                    Token::Number(n) if n >= 1.0 && n.fract() == 0.0 && n <= 1e15 => {
                        ExprKind::Bucket(n as u64)
                    }
                    other => {
                        return Err(RuleError::new(
                            span,
                            format!(
                                "bucket takes a whole number of buckets >= 1, found {}",
                                other.describe()
                            ),
                        ))
                    }
                }
            }
            _ => {
                return Err(RuleError::new(
                    name_span,
                    format!("unknown function '{name}' (known: {FUNCTIONS})"),
                ))
            }
        };
        let (token, span) = self.next();
        if token == Token::Comma {
            let takes = match name.as_str() {
                "count" => "1 or 2 arguments: count(EVENT) or count(EVENT, WINDOW)",
                "sum" | "avg" | "min" | "max" => {
                    "2 or 3 arguments: (EVENT, \"property\") or (EVENT, \"property\", WINDOW)"
                }
                _ => "1 argument",
            };
            return Err(RuleError::new(
                span,
                format!("too many arguments: {name}() takes {takes}"),
            ));
        }
        if token != Token::RParen {
            return Err(RuleError::new(
                span,
                format!(
                    "expected ')' to close {name}(...), found {}",
                    token.describe()
                ),
            ));
        }
        node(kind, name_span.to(span), name_span)
    }

    fn optional_window(&mut self) -> Result<Option<i64>, RuleError> {
        if *self.peek().0 != Token::Comma {
            return Ok(None);
        }
        self.pos += 1;
        let (token, span) = self.next();
        match token {
            Token::Duration(millis) if millis > 0 => Ok(Some(millis)),
            Token::Duration(_) => Err(RuleError::new(span, "a window must be longer than zero")),
            other => Err(RuleError::new(
                span,
                format!(
                    "expected a window duration like 7d, found {}",
                    other.describe()
                ),
            )),
        }
    }

    fn matcher(&mut self) -> Result<Matcher, RuleError> {
        let (token, span) = self.next();
        let event = match token {
            Token::Ident(word) if word == "any" => None,
            Token::Str(name) => Some(name),
            other => {
                return Err(RuleError::new(
                    span,
                    format!(
                        "expected an event: a quoted event name or 'any', found {}",
                        other.describe()
                    ),
                ))
            }
        };
        let mut conditions = Vec::new();
        let mut end = span;
        if self.eat_keyword("where") {
            loop {
                let (condition, condition_span) = self.condition()?;
                conditions.push(condition);
                end = condition_span;
                if !self.eat_keyword("and") {
                    break;
                }
            }
        }
        Ok(Matcher {
            event,
            conditions,
            span: span.to(end),
        })
    }

    fn condition(&mut self) -> Result<(Condition, Span), RuleError> {
        let (token, start) = self.peek();
        let path = match token {
            Token::Str(key) => {
                let key = key.clone();
                self.pos += 1;
                vec![key]
            }
            Token::Ident(_) => self.dotted_path()?.0,
            other => {
                return Err(RuleError::new(
                    start,
                    format!(
                        "expected a property name after 'where', found {}",
                        other.describe()
                    ),
                ))
            }
        };
        let (token, op_span) = self.next();
        let op = match token {
            Token::Eq => BinOp::Eq,
            Token::Ne => BinOp::Ne,
            Token::Lt => BinOp::Lt,
            Token::Le => BinOp::Le,
            Token::Gt => BinOp::Gt,
            Token::Ge => BinOp::Ge,
            Token::Ident(word) if word == "in" => {
                self.expect(Token::LBracket, "'[' to start the list")?;
                let mut values = Vec::new();
                if *self.peek().0 != Token::RBracket {
                    loop {
                        values.push(self.literal()?.0);
                        if *self.peek().0 != Token::Comma {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                let close = self.expect(Token::RBracket, "']' to close the list")?;
                return Ok((Condition::In { path, values }, start.to(close)));
            }
            Token::Ident(word) if word == "is" => {
                let negated = self.eat_keyword("not");
                let null_span = self.peek().1;
                if !self.eat_keyword("null") {
                    return Err(RuleError::new(null_span, "expected 'null' after 'is'"));
                }
                return Ok((Condition::IsNull { path, negated }, start.to(null_span)));
            }
            other => {
                return Err(RuleError::new(
                    op_span,
                    format!(
                        "expected a comparison (==, !=, <, <=, >, >=, in, is null) after the property, found {}",
                        other.describe()
                    ),
                ))
            }
        };
        let (value, value_span) = self.literal()?;
        Ok((Condition::Compare { path, op, value }, start.to(value_span)))
    }

    fn literal(&mut self) -> Result<(Literal, Span), RuleError> {
        let (token, span) = self.next();
        match token {
            Token::Number(number) => Ok((Literal::Number(number), span)),
            Token::Minus => match self.next() {
                (Token::Number(number), end) => Ok((Literal::Number(-number), span.to(end))),
                (other, end) => Err(RuleError::new(
                    end,
                    format!("expected a number after '-', found {}", other.describe()),
                )),
            },
            Token::Str(text) => Ok((Literal::Str(text), span)),
            Token::Ident(word) if word == "true" => Ok((Literal::Bool(true), span)),
            Token::Ident(word) if word == "false" => Ok((Literal::Bool(false), span)),
            Token::Ident(word) if word == "null" => Err(RuleError::new(
                span,
                "comparing with null is always false; use 'is null' or 'is not null'",
            )),
            other => Err(RuleError::new(
                span,
                format!(
                    "expected a literal value (number, string, true or false), found {}",
                    other.describe()
                ),
            )),
        }
    }

    fn dotted_path(&mut self) -> Result<(Vec<String>, Span), RuleError> {
        let mut path = Vec::new();
        let (token, first) = self.next();
        let Token::Ident(name) = token else {
            return Err(RuleError::new(
                first,
                format!("expected a name, found {}", token.describe()),
            ));
        };
        path.push(name);
        let mut span = first;
        while *self.peek().0 == Token::Dot {
            self.pos += 1;
            let (token, part_span) = self.next();
            let Token::Ident(part) = token else {
                return Err(RuleError::new(
                    part_span,
                    format!("expected a name after '.', found {}", token.describe()),
                ));
            };
            path.push(part);
            span = span.to(part_span);
        }
        Ok((path, span))
    }

    fn expr_list(&mut self) -> Result<(Vec<Expr>, Span), RuleError> {
        let open = self.expect(Token::LBracket, "'[' to start the list after 'in'")?;
        let mut items = Vec::new();
        if *self.peek().0 != Token::RBracket {
            loop {
                items.push(self.additive()?);
                if *self.peek().0 != Token::Comma {
                    break;
                }
                self.pos += 1;
            }
        }
        let close = self.expect(Token::RBracket, "']' or ',' in the list")?;
        Ok((items, open.to(close)))
    }
}

fn binary(op: BinOp, lhs: Expr, rhs: Expr) -> Result<Expr, RuleError> {
    let span = lhs.span.to(rhs.span);
    let at = rhs.span;
    let kind = ExprKind::Binary {
        op,
        lhs: Box::new(lhs),
        rhs: Box::new(rhs),
    };
    node(kind, span, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        parse(text).expect("parses").to_string()
    }

    #[test]
    fn precedence() {
        assert_eq!(
            canonical(r#"count("A") + 2 * 3 >= 7 and not trait.vip or trait.x is null"#),
            r#"((((count("A") + (2 * 3)) >= 7) and (not trait.vip)) or (trait.x is null))"#
        );
    }

    #[test]
    fn matchers_with_where() {
        assert_eq!(
            canonical(
                r#"sum("Order Completed" where currency == "EUR" and items.count >= 2, "revenue", 30d) >= 100"#
            ),
            r#"(sum("Order Completed" where currency == "EUR" and items.count >= 2, "revenue", 30d) >= 100)"#
        );
        assert_eq!(
            canonical(r#"count(any where "a b" in ["x", 1, true]) > 0"#),
            r#"(count(any where "a b" in ["x", 1, true]) > 0)"#
        );
    }

    #[test]
    fn spec_examples_parse() {
        for rule in [
            r#"last("Product Added") > last("Order Completed") and since(last("Product Added")) >= 1h"#,
            "since(last(any)) >= 30d",
            r#"count("Order Completed", 30d) >= 3"#,
            r#"sum("Order Completed", "revenue", 365d) >= 1000"#,
            r#"trait.country in ["NL", "BE"] and count("Email Opened", 14d) >= 2"#,
            r#"in_segment("big_spender") and bucket(100) < 10"#,
            "trait.plan is not null and -(1) < 0",
        ] {
            assert!(parse(rule).is_ok(), "{rule}");
        }
    }

    #[test]
    fn errors_point_at_the_problem() {
        let cases = [
            ("lst(any) > 1", 0, "unknown function 'lst'"),
            ("count(Order) > 1", 6, "expected an event"),
            ("count(any) > ", 13, "expected a value"),
            ("count(any) > 1 < 2", 15, "cannot be chained"),
            ("count(any, 7) > 1", 11, "window duration"),
            ("any > 1", 0, "event matcher"),
            ("count(any) = 1", 11, "'=='"),
            ("count(any where x == null) > 0", 21, "is null"),
        ];
        for (rule, offset, words) in cases {
            let err = parse(rule).expect_err(rule);
            assert_eq!(err.span.start, offset, "{rule}: {}", err.message);
            assert!(err.message.contains(words), "{rule}: {}", err.message);
        }
    }

    /// 30,000 of each way to nest (60 KB, under the HTTP body limit) used to overflow the
    /// stack and abort the process; now each is an error at the first level too deep.
    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let n = 30_000;
        // Where the parser stops: the first token inside the level past MAX_NESTING.
        let limit = MAX_NESTING as usize;
        let cases = [
            (
                format!("{}count(any) > 0{}", "(".repeat(n), ")".repeat(n)),
                limit,
            ),
            (format!("{}true", "not ".repeat(n)), 4 * limit),
            (format!("{}1 > 0", "-".repeat(n)), limit),
            (
                format!("{}last(any){} > 0", "since(".repeat(n), ")".repeat(n)),
                6 * limit,
            ),
            (format!("count(any) > 0{}", " or true".repeat(n)), 0),
            (format!("1{} > 0", " + 1".repeat(n)), 0),
            (format!("{}1{}", "(1 in [".repeat(n), "])".repeat(n)), 0),
        ];
        for (rule, offset) in cases {
            let shape = &rule[..20];
            let err = parse(&rule).expect_err(shape);
            assert!(
                err.message.contains("nested too deeply"),
                "{shape}: {}",
                err.message
            );
            if offset > 0 {
                assert_eq!(err.span.start, offset, "{shape}: {}", err.message);
            }
        }
    }

    /// Every shape of nesting at the limit parses, and everything that recurses over the tree
    /// (compile, eval, explain, Display, drop) fits in a 1 MiB stack — half of a tokio worker's
    /// default 2 MiB.
    #[test]
    fn the_deepest_allowed_rules_fit_in_a_small_stack() {
        let levels = MAX_DEPTH as usize;
        let nesting = MAX_NESTING as usize - 1;
        let rules = [
            format!(
                "{}count(any) > 0{}",
                "(".repeat(nesting),
                ")".repeat(nesting)
            ),
            format!("{}count(any) > 0", "not ".repeat(nesting)),
            format!(
                "{}count(any) > 0{}",
                "not (".repeat(nesting / 2),
                ")".repeat(nesting / 2)
            ),
            format!("{}count(any) > 0", "-".repeat(nesting)),
            format!("count(any) > 0{}", " or count(any) > 1".repeat(levels - 2)),
            format!("(1{}) > 0", " * count(any)".repeat(levels - 2)),
        ];
        for rule in rules {
            let worker = std::thread::Builder::new()
                .stack_size(1 << 20)
                .spawn(move || exercise(&rule))
                .expect("spawn");
            let outcome = worker.join().expect("no stack overflow or panic");
            assert!(outcome.is_ok(), "{outcome:?}");
        }
        let one_too_many = format!("count(any) > 0{}", " or count(any) > 1".repeat(levels - 1));
        assert!(parse(&one_too_many).is_err(), "a chain one level deeper");
        let one_too_deep = format!("{}count(any) > 0", "not ".repeat(nesting + 1));
        assert!(parse(&one_too_deep).is_err(), "nesting one level deeper");
    }

    fn exercise(rule: &str) -> Result<(), String> {
        use crate::features::CustomerState;
        use crate::rules::{compile, evaluate, explain, SegmentDef};
        let shape = &rule[..20];
        let ast = parse(rule).map_err(|err| format!("{shape}: {err}"))?;
        let canonical = ast.to_string();
        match parse(&canonical) {
            Ok(reparsed) if reparsed.to_string() != canonical => {
                return Err(format!("{shape}: canonical text is not stable"));
            }
            Ok(_) => {}
            Err(err) if err.message.contains("nested too deeply") => {}
            Err(err) => return Err(format!("{shape} canonical: {err}")),
        }
        let program = compile(&[SegmentDef {
            id: "deep".into(),
            description: None,
            rule: rule.to_string(),
        }])
        .map_err(|errors| format!("{shape}: {errors:?}"))?;
        let state = CustomerState::new(&program.layout, 1);
        let evaluation = evaluate(&program, &state, "c", 1_000);
        let explained = explain(&program, &state, "c", 1_000, 0, 4);
        drop((ast, evaluation, explained, program));
        Ok(())
    }
}
