//! containerd filter expressions (`pkg/filters`): parsing and matching of the
//! `filters` strings sent in Snapshots API `Walk` requests.
//!
//! A filter string is a comma-separated conjunction of selectors
//! `<fieldpath>[<op><value>]`, with `op` one of `==`, `!=` or `~=` (regular
//! expression, unanchored search). A selector without an operator tests that
//! the field is present. Field paths are `.`-separated components, each either
//! bare (`[A-Za-z0-9_-]+`) or a double-quoted string, e.g.
//! `labels."containerd.io/gc.root"`. Values are bare (everything up to `,` or
//! whitespace) or double-quoted; after `~=` they may also be quoted with `/` or
//! `|`. Quoted strings take Go escapes (`\n`, `\\`, `\"`, `\x41`, `\u00e9`, ...).
//! Several strings in one request are OR'ed; an empty list or an empty string
//! matches everything. Whitespace between tokens is ignored.
//!
//! Absent fields follow containerd's `selector.Match`: they compare as the
//! empty string for `!=` and `~=` (so `name!=foo` matches when there is no
//! name), while `==` and presence require the field to be present.
//!
//! The snapshot adaptor exposes `name`, `parent`, `kind` (`active`, `view`,
//! `committed`) and `labels.<key>`, where `<key>` is the remaining path
//! components joined with `.` (as containerd does).

use regex::Regex;

/// Access to the fields of an object being matched against a [`Filter`].
pub trait Adaptor {
    /// Value of the field at `path` (components already unquoted), or None if absent.
    fn field(&self, path: &[String]) -> Option<String>;
}

/// A parsed filter: an OR of conjunctions of selectors.
#[derive(Clone, Debug)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

/// Why a filter string was rejected (containerd reports these as InvalidArgument).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The string does not follow the filter grammar.
    #[error("filter {filter:?} at position {position}: {expected}")]
    Syntax {
        /// The offending filter string.
        filter: String,
        /// Byte offset of the error in `filter`.
        position: usize,
        /// What was expected (or found) there.
        expected: String,
    },
    /// The value of a `~=` selector is not a valid regular expression.
    #[error(
        "filter {filter:?} at position {position}: expected a valid regular expression: {source}"
    )]
    Regex {
        /// The offending filter string.
        filter: String,
        /// Byte offset of the regular expression in `filter`.
        position: usize,
        /// The regex compiler's complaint.
        source: regex::Error,
    },
}

#[derive(Clone, Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Clone, Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Filter {
    /// Parses every string in `filters` into one filter matching when any of
    /// them matches; an empty list matches everything.
    pub fn parse_all(filters: &[String]) -> Result<Filter, FilterError> {
        if filters.is_empty() {
            return Ok(Filter { any: vec![vec![]] });
        }
        let any = filters
            .iter()
            .map(|f| Parser { input: f, pos: 0 }.parse())
            .collect::<Result<_, _>>()?;
        Ok(Filter { any })
    }

    /// Whether the object behind `adaptor` satisfies the filter.
    pub fn matches(&self, adaptor: &dyn Adaptor) -> bool {
        self.any
            .iter()
            .any(|all| all.iter().all(|s| s.matches(adaptor)))
    }
}

impl Selector {
    fn matches(&self, adaptor: &dyn Adaptor) -> bool {
        let value = adaptor.field(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value.as_deref() == Some(v.as_str()),
            Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, position: usize, expected: &str) -> FilterError {
        FilterError::Syntax {
            filter: self.input.to_string(),
            position,
            expected: expected.to_string(),
        }
    }

    /// Next non-whitespace character (not consumed); `pos` is left on it.
    fn peek(&mut self) -> Option<char> {
        let rest = &self.input[self.pos..];
        let trimmed = rest.trim_start();
        self.pos += rest.len() - trimmed.len();
        trimmed.chars().next()
    }

    /// Consumes the longest run of characters satisfying `keep`.
    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let rest = &self.input[self.pos..];
        let end = rest.find(|c| !keep(c)).unwrap_or(rest.len());
        self.pos += end;
        rest[..end].to_string()
    }

    fn parse(mut self) -> Result<Vec<Selector>, FilterError> {
        if self.input.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(p) = self.input.find('\0') {
            return Err(self.err(p, "unexpected null character"));
        }
        let mut selectors = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(selectors),
                Some(',') => {
                    self.pos += 1;
                    selectors.push(self.selector()?);
                }
                Some(_) => return Err(self.err(self.pos, "expected ',' or end of filter")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        if matches!(self.peek(), None | Some(',')) {
            let op = Op::Present;
            return Ok(Selector { path, op });
        }
        let start = self.pos;
        let op = self.take_while(|c| matches!(c, '=' | '!' | '~'));
        if !matches!(op.as_str(), "==" | "!=" | "~=") {
            let expected = if op.is_empty() {
                r#"expected an operator ("==", "!=" or "~=")"#.to_string()
            } else {
                format!("unsupported operator {op:?}")
            };
            return Err(self.err(start, &expected));
        }
        self.peek();
        let vpos = self.pos;
        let value = self.value(op == "~=")?;
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => Op::Matches(Regex::new(&value).map_err(|source| FilterError::Regex {
                filter: self.input.to_string(),
                position: vpos,
                source,
            })?),
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        let is_field = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if is_field(c) => Ok(self.take_while(is_field)),
            Some('/' | '|') => {
                Err(self.err(self.pos, "expected a field name or '\"'-quoted field"))
            }
            _ => Err(self.err(self.pos, "expected a field name or quoted field")),
        }
    }

    fn value(&mut self, regex: bool) -> Result<String, FilterError> {
        match self.peek() {
            None | Some(',') => Err(self.err(self.pos, "expected a value")),
            Some('"') => self.quoted('"'),
            Some(q @ ('/' | '|')) if regex => self.quoted(q),
            Some('/' | '|') => Err(self.err(self.pos, "expected a bare or '\"'-quoted value")),
            Some(_) => Ok(self.take_while(|c| c != ',' && !c.is_whitespace())),
        }
    }

    /// Reads a string quoted with `quote` (the current character) and
    /// resolves Go-style escapes.
    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        let open = self.pos;
        self.pos += 1;
        let mut out = String::new();
        let input = self.input;
        let mut chars = input[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            let at = self.pos + i;
            match c {
                '\n' => break,
                c if c == quote => {
                    self.pos = at + 1;
                    return Ok(out);
                }
                '\\' => {
                    let bad = || self.err(at, "expected a valid escape sequence");
                    let (_, e) = chars.next().ok_or_else(bad)?;
                    if let Some(i) = "abfnrtv".find(e) {
                        out.push(['\x07', '\x08', '\x0c', '\n', '\r', '\t', '\x0b'][i]);
                        continue;
                    }
                    let (digits, radix) = match e {
                        '0'..='7' => (2, 8),
                        'x' => (2, 16),
                        'u' => (4, 16),
                        'U' => (8, 16),
                        e if e == '\\' || e == quote => {
                            out.push(e);
                            continue;
                        }
                        _ => return Err(bad()),
                    };
                    let mut code = e.to_digit(8).unwrap_or(0);
                    for _ in 0..digits {
                        let d = chars.next().and_then(|(_, d)| d.to_digit(radix));
                        code = code * radix + d.ok_or_else(bad)?;
                    }
                    // Go's \x and octal escapes produce raw bytes; only ASCII
                    // bytes can be represented in a Rust string.
                    let byte_escape = matches!(e, 'x' | '0'..='7');
                    match char::from_u32(code) {
                        Some(c) if !byte_escape || c.is_ascii() => out.push(c),
                        _ => return Err(bad()),
                    }
                }
                c => out.push(c),
            }
        }
        Err(self.err(open, "expected a closing quote"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Obj {
        name: Option<&'static str>,
        labels: HashMap<String, String>,
    }

    impl Adaptor for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path.first().map(String::as_str) {
                Some("name") => self.name.map(str::to_string),
                Some("labels") => self.labels.get(&path[1..].join(".")).cloned(),
                _ => None,
            }
        }
    }

    fn obj(name: &'static str, labels: &[(&str, &str)]) -> Obj {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Obj {
            name: Some(name),
            labels: labels.collect(),
        }
    }

    fn check(filters: &[&str], o: &Obj) -> bool {
        let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filter::parse_all(&filters).unwrap().matches(o)
    }

    fn error(filter: &str) -> String {
        let err = Filter::parse_all(&[filter.to_string()]).unwrap_err();
        err.to_string()
    }

    #[test]
    fn equality_and_inequality() {
        let o = obj("foo", &[]);
        assert!(check(&["name==foo"], &o));
        assert!(!check(&["name==bar"], &o));
        assert!(check(&["name!=bar"], &o));
        assert!(!check(&["name!=foo"], &o));
        assert!(check(&["  name == foo"], &o));
        assert!(check(&["name==foo.bar-1"], &obj("foo.bar-1", &[])));
    }

    #[test]
    fn presence() {
        let o = obj("foo", &[("a", "")]);
        assert!(check(&["name"], &o));
        assert!(check(&["labels.a"], &o));
        assert!(!check(&["labels.b"], &o));
        assert!(!check(&["parent"], &o));
    }

    #[test]
    fn regex() {
        let o = obj("sha256:abc", &[]);
        assert!(check(&["name~=^sha256:"], &o));
        assert!(check(&["name~=b"], &o), "search is unanchored");
        assert!(!check(&["name~=^abc"], &o));
        assert!(check(&["name~=/[a-c]{3}$/"], &o));
        assert!(check(&["name~=|sha256|"], &o));
        assert!(check(&[r"name~=/\/?sha/"], &o));
        assert!(!check(&[r#"name~=/[abc]{0,1}"\//,name!=foo"#], &o));
    }

    #[test]
    fn quoted_label_keys_and_values() {
        let o = obj("x", &[("containerd.io/gc.root", "a b, c"), ("a\"b\\", "1")]);
        assert!(check(&[r#"labels."containerd.io/gc.root""#], &o));
        assert!(check(&[r#"labels."containerd.io/gc.root"=="a b, c""#], &o));
        assert!(check(&[r#"labels."containerd.io/gc.root"~="b, c$""#], &o));
        assert!(check(&[r#"labels.containerd."io/gc".root"#], &o));
        assert!(check(&[r#"labels."a\"b\\"=="\x31""#], &o));
        assert!(check(&[r#"labels."a\u0022b\134"=="\U00000031""#], &o));
        assert!(!check(&[r#"labels."containerd.io/gc.root"=="a b""#], &o));
    }

    #[test]
    fn conjunction_and_disjunction() {
        let o = obj("foo", &[("a", "1")]);
        assert!(check(&["name==foo,labels.a==1"], &o));
        assert!(!check(&["name==foo,labels.a==2"], &o));
        assert!(check(&["name==bar", "labels.a==1"], &o));
        assert!(!check(&["name==bar", "labels.a==2"], &o));
    }

    #[test]
    fn empty_matches_all() {
        let o = obj("foo", &[]);
        assert!(check(&[], &o));
        assert!(check(&[""], &o));
        assert!(check(&["name==bar", ""], &o));
    }

    #[test]
    fn absent_fields() {
        let o = Obj::default();
        assert!(!check(&["name==foo"], &o));
        assert!(check(&["name!=foo"], &o), "absent compares as empty for !=");
        assert!(!check(&[r#"name!="""#], &o));
        assert!(!check(&[r#"name=="""#], &o), "== needs presence");
        assert!(check(&["name~=^$"], &o), "absent compares as empty for ~=");
        assert!(!check(&["name"], &o));
    }

    #[test]
    fn syntax_errors() {
        let cases = [
            ("name==", 6, "expected a value"),
            ("name==,x", 6, "expected a value"),
            ("name==foo,", 10, "expected a field name or quoted field"),
            ("labels.", 7, "expected a field name or quoted field"),
            ("labels.?x", 7, "expected a field name or quoted field"),
            (" ", 1, "expected a field name or quoted field"),
            ("labels.|x|", 7, "'\"'-quoted field"),
            ("labels.ns/key==v", 9, "expected an operator"),
            ("name=foo", 4, "unsupported operator \"=\""),
            ("name===foo", 4, "unsupported operator \"===\""),
            ("name foo", 5, "expected an operator"),
            ("name==foo bar", 10, "expected ',' or end of filter"),
            ("name==/foo/", 6, "expected a bare or '\"'-quoted value"),
            ("name==\"foo", 6, "expected a closing quote"),
            ("name==\"a\nb\"", 6, "expected a closing quote"),
            (r#"name=="\q""#, 7, "expected a valid escape sequence"),
            (r#"name=="\x4""#, 7, "expected a valid escape sequence"),
            (r#"name=="\xff""#, 7, "expected a valid escape sequence"),
            ("name==a\0", 7, "unexpected null character"),
        ];
        for (filter, pos, expected) in cases {
            let msg = error(filter);
            let prefix = format!("filter {filter:?} at position {pos}: ");
            assert!(msg.starts_with(&prefix), "{filter:?}: {msg}");
            assert!(msg.contains(expected), "{filter:?}: {msg}");
        }
        assert_eq!(
            error("name=="),
            r#"filter "name==" at position 6: expected a value"#
        );
    }

    #[test]
    fn invalid_regex() {
        let msg = error("name~=(a");
        assert!(
            msg.starts_with(
                r#"filter "name~=(a" at position 6: expected a valid regular expression"#
            ),
            "{msg}"
        );
        let err = Filter::parse_all(&["name==a".into(), "name~=[".into()]).unwrap_err();
        assert!(matches!(err, FilterError::Regex { position: 6, .. }));
    }
}
