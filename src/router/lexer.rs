//! A lexer for PostgreSQL's lexical structure, enough to classify statements: it skips `--` and
//! nested `/* */` comments and every quoting form (`'...'`, `E'...'`, `U&'...'`, `B'...'`,
//! `X'...'`, `$tag$...$tag$`, `"..."`, `U&"..."`) so keywords hidden inside them are never
//! seen. It never allocates and never panics; unterminated constructs end at the input's end.

/// One token. Words are unquoted identifiers or keywords, compared case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    Word(&'a str),
    /// A quoted identifier (contents without the quotes; `""` escapes left as is).
    Quoted(&'a str),
    /// Any string constant (contents without quotes or prefixes).
    Str(&'a str),
    Number,
    Param,
    /// A single punctuation or operator character: `(`, `)`, `,`, `;`, `.`, `=`, `*` …
    Punct(u8),
}

impl Token<'_> {
    pub fn is_word(&self, kw: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(kw))
    }
}

pub struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(src: &'a str) -> Self {
        Lexer { src, pos: 0 }
    }

    /// Byte offset of the next unread character.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn peek(&self, off: usize) -> u8 {
        self.bytes().get(self.pos + off).copied().unwrap_or(0)
    }

    /// Skips whitespace and comments; returns the text of the first block comment skipped
    /// (used for routing hints).
    pub fn skip_trivia(&mut self) -> Option<&'a str> {
        let mut first_comment = None;
        loop {
            let c = self.peek(0);
            if c.is_ascii_whitespace() {
                self.pos += 1;
            } else if c == b'-' && self.peek(1) == b'-' {
                while self.pos < self.src.len() && self.peek(0) != b'\n' {
                    self.pos += 1;
                }
            } else if c == b'/' && self.peek(1) == b'*' {
                let start = self.pos + 2;
                self.pos += 2;
                let mut depth = 1usize;
                while self.pos < self.src.len() && depth > 0 {
                    if self.peek(0) == b'/' && self.peek(1) == b'*' {
                        depth += 1;
                        self.pos += 2;
                    } else if self.peek(0) == b'*' && self.peek(1) == b'/' {
                        depth -= 1;
                        self.pos += 2;
                    } else {
                        self.pos += 1;
                    }
                }
                let end = if depth == 0 { self.pos - 2 } else { self.pos };
                if first_comment.is_none() {
                    first_comment = self.src.get(start..end.max(start));
                }
            } else {
                return first_comment;
            }
        }
    }

    /// Consumes a single-quoted body starting after the opening quote. `backslash` enables
    /// `E''`-style escapes.
    fn quoted(&mut self, quote: u8, backslash: bool) -> &'a str {
        let start = self.pos;
        loop {
            let c = self.peek(0);
            if self.pos >= self.src.len() {
                return self.slice(start, self.pos);
            }
            if backslash && c == b'\\' {
                self.pos = (self.pos + 2).min(self.src.len());
            } else if c == quote {
                if self.peek(1) == quote {
                    self.pos += 2;
                } else {
                    let body = self.slice(start, self.pos);
                    self.pos += 1;
                    return body;
                }
            } else {
                self.pos += 1;
            }
        }
    }

    fn slice(&self, start: usize, end: usize) -> &'a str {
        self.src.get(start..end).unwrap_or("")
    }

    /// At a `$`: a dollar-quoted string if a valid tag follows, else a parameter or operator.
    fn dollar(&mut self) -> Token<'a> {
        let bytes = self.bytes();
        let tag_start = self.pos + 1;
        let mut i = tag_start;
        if bytes.get(i).is_some_and(u8::is_ascii_digit) {
            while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            self.pos = i;
            return Token::Param;
        }
        while bytes.get(i).is_some_and(|&b| is_ident_char(b) && b != b'$') {
            i += 1;
        }
        if bytes.get(i) != Some(&b'$') {
            self.pos += 1;
            return Token::Punct(b'$');
        }
        let tag = &bytes[self.pos..=i];
        let body_start = i + 1;
        let body_end = find(&bytes[body_start..], tag).map(|p| body_start + p);
        match body_end {
            Some(end) => {
                self.pos = end + tag.len();
                Token::Str(self.slice(body_start, end))
            }
            None => {
                self.pos = bytes.len();
                Token::Str(self.slice(body_start, bytes.len()))
            }
        }
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        self.skip_trivia();
        let c = self.peek(0);
        if self.pos >= self.src.len() {
            return None;
        }
        let prefixed = |p: u8| c.eq_ignore_ascii_case(&p) && self.peek(1) == b'\'';
        if c == b'\'' {
            self.pos += 1;
            return Some(Token::Str(self.quoted(b'\'', false)));
        }
        if prefixed(b'e') {
            self.pos += 2;
            return Some(Token::Str(self.quoted(b'\'', true)));
        }
        if prefixed(b'b') || prefixed(b'x') || prefixed(b'n') {
            self.pos += 2;
            return Some(Token::Str(self.quoted(b'\'', false)));
        }
        if c.eq_ignore_ascii_case(&b'u') && self.peek(1) == b'&' {
            match self.peek(2) {
                b'\'' => {
                    self.pos += 3;
                    return Some(Token::Str(self.quoted(b'\'', false)));
                }
                b'"' => {
                    self.pos += 3;
                    return Some(Token::Quoted(self.quoted(b'"', false)));
                }
                _ => {}
            }
        }
        if c == b'"' {
            self.pos += 1;
            return Some(Token::Quoted(self.quoted(b'"', false)));
        }
        if c == b'$' {
            return Some(self.dollar());
        }
        if is_ident_start(c) {
            let start = self.pos;
            while self.pos < self.src.len() && is_ident_char(self.peek(0)) {
                self.pos += 1;
            }
            return Some(Token::Word(self.slice(start, self.pos)));
        }
        if c.is_ascii_digit() || (c == b'.' && self.peek(1).is_ascii_digit()) {
            while self.pos < self.src.len()
                && (self.peek(0).is_ascii_alphanumeric()
                    || self.peek(0) == b'.'
                    || self.peek(0) == b'_')
            {
                self.pos += 1;
            }
            return Some(Token::Number);
        }
        // Any other byte is punctuation; step over a whole UTF-8 sequence to stay on a boundary.
        self.pos += 1;
        while self.pos < self.src.len() && !self.src.is_char_boundary(self.pos) {
            self.pos += 1;
        }
        Some(Token::Punct(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> Vec<String> {
        Lexer::new(sql)
            .filter_map(|t| match t {
                Token::Word(w) => Some(w.to_ascii_lowercase()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn keywords_inside_quotes_and_comments_are_invisible() {
        let sql = "SELECT 'delete' , E'it\\'s update', $q$ insert $q$, \"update\" -- drop\n /* a /* nested */ insert */ FROM t";
        assert_eq!(words(sql), ["select", "from", "t"]);
        assert_eq!(
            words("SELECT U&'d\\0061te', U&\"x\" , b'01', x'ff'"),
            ["select"]
        );
    }

    #[test]
    fn dollar_forms() {
        let toks: Vec<_> = Lexer::new("$1 $$ body; $$ $a$x$a$ a$b").collect();
        assert_eq!(toks[0], Token::Param);
        assert_eq!(toks[1], Token::Str(" body; "));
        assert_eq!(toks[2], Token::Str("x"));
        assert_eq!(toks[3], Token::Word("a$b"));
    }

    #[test]
    fn unterminated_input_ends_cleanly() {
        for sql in [
            "'abc",
            "E'\\",
            "$tag$ never",
            "/* open",
            "\"id",
            "U&",
            "$",
            "é'",
        ] {
            let _ = Lexer::new(sql).count();
        }
    }

    #[test]
    fn first_comment_is_reported() {
        let mut lx = Lexer::new("  /* pgpilot:replica */ SELECT 1");
        assert_eq!(lx.skip_trivia(), Some(" pgpilot:replica "));
    }
}
