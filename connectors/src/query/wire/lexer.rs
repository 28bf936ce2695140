//! A query string's tokens, read by DataFusion's own SQL tokenizer (sqlparser) with the
//! PostgreSQL dialect the session parses with, so strings, quoted identifiers, comments and
//! dollar quoting are read here exactly as the planner reads them.
//!
//! The wire layer needs tokens for what the planner cannot do for it: splitting a simple-query
//! string into statements (some are answered here, the others run one by one), recognising the
//! statements it answers itself (`SET ...` has many forms DataFusion does not parse), and
//! finding `$n` and `current_setting('...')` before a statement is planned.

use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, Tokenizer};

/// One token and where it is in the query string.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Lexeme<'a> {
    /// `None` for the rest of a string the tokenizer cannot read (an unterminated string or
    /// comment, an invalid escape): it stays one piece, and the planner reports the error.
    pub(super) token: Option<Token>,
    /// The token's text as written.
    pub(super) text: &'a str,
    /// Byte offsets of the text in the query string.
    pub(super) start: usize,
    pub(super) end: usize,
}

impl Lexeme<'_> {
    /// Not white space or a comment.
    pub(super) fn is_significant(&self) -> bool {
        !matches!(self.token, Some(Token::Whitespace(_)))
    }

    /// The lower-case text of an unquoted word (keywords included).
    pub(super) fn word(&self) -> Option<String> {
        match &self.token {
            Some(Token::Word(w)) if w.quote_style.is_none() => Some(w.value.to_ascii_lowercase()),
            _ => None,
        }
    }

    /// `n` of a positional parameter `$n` (`usize::MAX` when it does not fit).
    pub(super) fn param(&self) -> Option<usize> {
        match &self.token {
            Some(Token::Placeholder(p)) => {
                let digits = p.strip_prefix('$')?;
                (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| digits.parse().unwrap_or(usize::MAX))
            }
            _ => None,
        }
    }

    /// Whether it is this token.
    pub(super) fn is(&self, token: &Token) -> bool {
        self.token.as_ref() == Some(token)
    }

    /// A standard `'...'` string (not `E'...'` or dollar-quoted).
    pub(super) fn is_string(&self) -> bool {
        matches!(self.token, Some(Token::SingleQuotedString(_)))
    }
}

/// The tokens of `sql`, covering it from start to end.
pub(super) fn lex(sql: &str) -> Vec<Lexeme<'_>> {
    let dialect = PostgreSqlDialect {};
    let mut tokens = Vec::new();
    // The tokens read before an error stay in `tokens`; the rest is one unreadable piece.
    let complete = Tokenizer::new(&dialect, sql)
        .with_unescape(false)
        .tokenize_with_location_into_buf(&mut tokens)
        .is_ok();
    let mut cursor = Cursor::new(sql);
    let mut out = Vec::with_capacity(tokens.len() + 1);
    for t in tokens {
        let start = cursor.offset_of(t.span.start);
        let end = cursor.offset_of(t.span.end);
        out.push(Lexeme {
            token: Some(t.token),
            text: &sql[start..end],
            start,
            end,
        });
    }
    let read = out.last().map_or(0, |l| l.end);
    if !complete || read < sql.len() {
        out.push(Lexeme {
            token: None,
            text: &sql[read..],
            start: read,
            end: sql.len(),
        });
    }
    out
}

/// Turns the tokenizer's locations (line, and column in characters, both from 1) into byte
/// offsets, walking the string once as the tokens come in order.
struct Cursor<'a> {
    chars: std::str::Chars<'a>,
    line: u64,
    column: u64,
    offset: usize,
}

impl<'a> Cursor<'a> {
    fn new(sql: &'a str) -> Self {
        Self {
            chars: sql.chars(),
            line: 1,
            column: 1,
            offset: 0,
        }
    }

    fn offset_of(&mut self, to: Location) -> usize {
        while (self.line, self.column) < (to.line, to.column) {
            let Some(c) = self.chars.next() else { break };
            self.offset += c.len_utf8();
            // As the tokenizer counts.
            if c == '\n' {
                self.line += 1;
                self.column = 1;
            } else {
                self.column += 1;
            }
        }
        self.offset
    }
}

/// The statements of a query string, without separators, comment-only ones dropped.
pub(super) fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut significant = false;
    for t in lex(sql) {
        if t.is(&Token::SemiColon) {
            if significant {
                out.push(sql[start..t.start].trim());
            }
            start = t.end;
            significant = false;
        } else if t.is_significant() {
            significant = true;
        }
    }
    if significant {
        out.push(sql[start..].trim());
    }
    out
}

/// The highest `$n` in `sql`, 0 when there is none.
pub(super) fn highest_param(sql: &str) -> usize {
    lex(sql).iter().filter_map(Lexeme::param).max().unwrap_or(0)
}

/// The value of a `'...'` string or `"..."` identifier as written.
pub(super) fn unquote(quoted: &str) -> String {
    let Some(q) = quoted.chars().next() else {
        return String::new();
    };
    let inner = quoted
        .strip_prefix(q)
        .and_then(|s| s.strip_suffix(q))
        .unwrap_or(&quoted[q.len_utf8()..]);
    inner.replace(&format!("{q}{q}"), &q.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_strings_and_comments() {
        assert_eq!(
            split_statements("SELECT ';' ; SELECT \"a;b\" -- x;y\n; /* ; /* ; */ */ ;$$;$$"),
            vec!["SELECT ';'", "SELECT \"a;b\" -- x;y", "$$;$$"]
        );
        assert_eq!(
            split_statements(" ;; -- only a comment"),
            Vec::<&str>::new()
        );
        assert_eq!(
            split_statements("/* größe; */ SELECT 'é;' AS \"ü\"; SELECT E'\\é;'"),
            vec!["/* größe; */ SELECT 'é;' AS \"ü\"", "SELECT E'\\é;'"]
        );
        assert_eq!(
            split_statements("SELECT E'\\';' ; x"),
            vec!["SELECT E'\\';'", "x"]
        );
        assert_eq!(
            split_statements("SELECT $tag$ ; $tag$"),
            vec!["SELECT $tag$ ; $tag$"]
        );
        assert_eq!(
            split_statements("SELECT 'unterminated ; x"),
            vec!["SELECT 'unterminated ; x"]
        );
    }

    #[test]
    fn tokens_cover_the_string_with_byte_offsets() {
        let sql = "SELECT 'é''s' AS \"ü\", $12\n  , $99999999999999999999 -- ü\n/* ; */ x";
        let tokens = lex(sql);
        assert_eq!(
            tokens.iter().map(|t| t.text).collect::<String>(),
            sql,
            "the tokens' texts are the string"
        );
        assert!(tokens.iter().all(|t| t.token.is_some()));
        let params: Vec<usize> = tokens.iter().filter_map(Lexeme::param).collect();
        assert_eq!(params, [12, usize::MAX]);
        assert!(tokens.iter().any(|t| t.is_string() && t.text == "'é''s'"));
        assert_eq!(unquote("'é''s'"), "é's");
        assert_eq!(unquote("\"a\"\"b\""), "a\"b");
        assert_eq!(highest_param("SELECT $2, '$9', $1 /* $7 */"), 2);

        // What the tokenizer cannot read stays one piece to the end.
        let tokens = lex("SELECT 1; SELECT 'open");
        let last = tokens.last().unwrap();
        assert_eq!((last.token.as_ref(), last.text), (None, "'open"));
    }
}
