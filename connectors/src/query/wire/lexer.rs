// ---------------------------------------------------------------------------------------------
// A small SQL lexer: enough to split statements, find `$n` and spot the statements answered
// here without being fooled by strings, quoted identifiers or comments.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tk {
    Space,
    Comment,
    Word,
    QuotedIdent,
    /// A standard `'...'` string.
    Str,
    /// An escape (`E'...'`) or dollar-quoted string.
    OtherStr,
    Param(usize),
    Semi,
    Punct(char),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Token {
    pub(super) kind: Tk,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl Token {
    pub(super) fn is_significant(&self) -> bool {
        !matches!(self.kind, Tk::Space | Tk::Comment)
    }
}

pub(super) fn lex(sql: &str) -> Vec<Token> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(c) = sql[i..].chars().next() {
        let start = i;
        let kind = if c.is_whitespace() {
            while let Some(c) = sql[i..].chars().next().filter(|c| c.is_whitespace()) {
                i += c.len_utf8();
            }
            Tk::Space
        } else if sql[i..].starts_with("--") {
            i = sql[i..].find('\n').map_or(sql.len(), |n| i + n);
            Tk::Comment
        } else if sql[i..].starts_with("/*") {
            // PostgreSQL block comments nest.
            i += 2;
            let mut depth = 1;
            // Bytes, not str: a step of one byte may land inside a multi-byte character.
            while i < b.len() && depth > 0 {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            Tk::Comment
        } else if c == '\'' {
            i = end_of_quoted(b, i, b'\'', false);
            Tk::Str
        } else if c == '"' {
            i = end_of_quoted(b, i, b'"', false);
            Tk::QuotedIdent
        } else if c == ';' {
            i += 1;
            Tk::Semi
        } else if c == '$' {
            let digits = b[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
            if digits > 0 {
                let n = sql[i + 1..i + 1 + digits].parse().unwrap_or(usize::MAX);
                i += 1 + digits;
                Tk::Param(n)
            } else if let Some(end) = end_of_dollar_quoted(sql, i) {
                i = end;
                Tk::OtherStr
            } else {
                i += 1;
                Tk::Punct('$')
            }
        } else if c.is_alphanumeric() || c == '_' {
            while let Some(c) = sql[i..]
                .chars()
                .next()
                .filter(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
            {
                i += c.len_utf8();
            }
            if (&sql[start..i] == "e" || &sql[start..i] == "E") && b.get(i) == Some(&b'\'') {
                // E'...': backslash escapes, so \' does not end it.
                i = end_of_quoted(b, i, b'\'', true);
                Tk::OtherStr
            } else {
                Tk::Word
            }
        } else {
            i += c.len_utf8();
            Tk::Punct(c)
        };
        out.push(Token {
            kind,
            start,
            end: i,
        });
    }
    out
}

/// The end of a quoted token opening at `i`; a doubled quote is part of it. Unterminated
/// runs to the end (the backend reports the error).
fn end_of_quoted(b: &[u8], i: usize, quote: u8, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        if backslash && b[j] == b'\\' {
            j += 2;
        } else if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

/// The end of a `$tag$...$tag$` string opening at `i`, or None if `i` opens no tag.
fn end_of_dollar_quoted(sql: &str, i: usize) -> Option<usize> {
    let b = sql.as_bytes();
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    if b.get(j) != Some(&b'$') {
        return None;
    }
    let tag = &sql[i..=j];
    Some(
        sql[j + 1..]
            .find(tag)
            .map_or(sql.len(), |n| j + 1 + n + tag.len()),
    )
}

/// The statements of a query string, without separators, comment-only ones dropped.
pub(super) fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut significant = false;
    for t in lex(sql) {
        match t.kind {
            Tk::Semi => {
                if significant {
                    out.push(sql[start..t.start].trim());
                }
                start = t.end;
                significant = false;
            }
            Tk::Space | Tk::Comment => {}
            _ => significant = true,
        }
    }
    if significant {
        out.push(sql[start..].trim());
    }
    out
}

/// The value of a `'...'` string or `"..."` identifier.
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
}
