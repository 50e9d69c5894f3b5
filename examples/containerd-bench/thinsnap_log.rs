//! Reading thinsnap's log (`--log ...thinsnap::service=debug` with `THINSNAP_LOG_SPANS=1`):
//! each request's own duration (`done ms=`) by method, and the busy time of every span
//! (`close time.busy=`) by its path of span names, e.g. `prepare > activate > create`.

use std::{collections::BTreeMap, path::Path};

/// What a stretch of the log says, in milliseconds.
#[derive(Debug, Default)]
pub struct LogTimes {
    /// `done ms=` of each request, by method.
    pub requests: BTreeMap<String, Vec<f64>>,
    /// Busy time of each closed span, by path (outermost first, request spans left out);
    /// for a span with child spans also `PATH (self)`: its busy time minus its children's
    /// (for requests one at a time, as in the benchmark's phases).
    pub spans: BTreeMap<String, Vec<f64>>,
}

/// Length of `path`, to read what a phase appends.
pub fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// `s` without ANSI escape sequences (tracing's colours, should they be on).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `text` split at `sep` outside braces and quotes.
fn split_top(text: &str, sep: char) -> Vec<&str> {
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    let mut out = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth -= 1,
            c if c == sep && !quoted && depth == 0 => {
                out.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// A duration as tracing prints it (`12.3ms`, `4.56µs`, `1.2s`, `780ns`) in ms.
fn duration_ms(v: &str) -> Option<f64> {
    for (unit, scale) in [
        ("ns", 1e-6),
        ("µs", 1e-3),
        ("us", 1e-3),
        ("ms", 1.0),
        ("s", 1e3),
    ] {
        if let Some(n) = v.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|n| n * scale);
        }
    }
    None
}

/// The span context of a log line: what follows the timestamp and level, up to `": "`
/// and the message.
fn context_and_message(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_start();
    let rest = rest.split_once(char::is_whitespace)?.1.trim_start(); // timestamp
    let rest = rest.split_once(char::is_whitespace)?.1.trim_start(); // level
    let i = rest.find(": ")?;
    // The context ends at the first ": " outside braces.
    let mut cut = None;
    let (mut depth, mut quoted) = (0i32, false);
    for (j, c) in rest.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth -= 1,
            ':' if !quoted && depth == 0 && rest[j..].starts_with(": ") => {
                cut = Some(j);
                break;
            }
            _ => {}
        }
    }
    let j = cut.unwrap_or(i);
    Some((&rest[..j], &rest[j + 2..]))
}

/// The value of `name=` among the whitespace-separated fields of `text`, unquoted.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.split([' ', '{', '}'])
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

/// Parses the log from byte `from` on.
pub fn read(path: &Path, from: u64) -> LogTimes {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[(from as usize).min(bytes.len())..]).into_owned();
    parse(&text)
}

/// Parses log text.
pub fn parse(text: &str) -> LogTimes {
    let mut t = LogTimes::default();
    // Busy time of the closed children of each open span path.
    let mut children: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        let line = strip_ansi(line);
        let Some((context, message)) = context_and_message(&line) else {
            continue;
        };
        if let Some(rest) = message.strip_prefix("done ") {
            if let (Some(method), Some(ms)) = (field(context, "method"), field(rest, "ms")) {
                if let Ok(ms) = ms.parse() {
                    t.requests.entry(method.to_string()).or_default().push(ms);
                }
            }
        } else if let Some(rest) = message.strip_prefix("close ") {
            let Some(busy) = field(rest, "time.busy").and_then(duration_ms) else {
                continue;
            };
            let path: Vec<&str> = split_top(context, ':')
                .into_iter()
                .map(|s| s.split('{').next().unwrap_or(s))
                .filter(|n| !n.is_empty() && *n != "request")
                .collect();
            if path.is_empty() {
                continue;
            }
            let key = path.join(" > ");
            if let Some(c) = children.remove(&key) {
                t.spans
                    .entry(format!("{key} (self)"))
                    .or_default()
                    .push((busy - c).max(0.0));
            }
            if path.len() > 1 {
                *children
                    .entry(path[..path.len() - 1].join(" > "))
                    .or_default() += busy;
            }
            t.spans.entry(key).or_default().push(busy);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_spans() {
        let log = "\
2026-11-25T22:21:06.123456Z DEBUG request{method=\"prepare\" key=cbench/3/p0-1-a}: done ms=41.5 code=Ok
2026-11-25T22:21:06.100000Z  INFO prepare{key=\"cbench/3/p0-1-a\"}:activate{id=7 size=Sectors(20)}:create{name=thinsnap-cbench-7}: close time.busy=12.5ms time.idle=3.10\u{b5}s
2026-11-25T22:21:06.100000Z  INFO prepare{key=\"a:b\"}:activate{id=7 size=Sectors(20)}: close time.busy=20ms time.idle=3.10\u{b5}s
2026-11-25T22:21:06.110000Z  INFO prepare{key=\"a:b\"}: close time.busy=1.5s time.idle=3.10\u{b5}s
2026-11-25T22:21:06.110000Z  INFO request{method=\"prepare\" key=x}: close time.busy=800\u{b5}s time.idle=40ms
\u{1b}[2m2026-11-25T22:21:06.123456Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m \u{1b}[1mrequest\u{1b}[0m{\u{1b}[3mmethod\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"view\" \u{1b}[3mkey\u{1b}[0m\u{1b}[2m=\u{1b}[0mk}\u{1b}[2m:\u{1b}[0m done \u{1b}[3mms\u{1b}[0m\u{1b}[2m=\u{1b}[0m7.25
";
        let t = parse(log);
        assert_eq!(t.requests["prepare"], vec![41.5]);
        assert_eq!(t.requests["view"], vec![7.25]);
        assert_eq!(t.spans["prepare > activate > create"], vec![12.5]);
        assert_eq!(t.spans["prepare"], vec![1500.0]);
        assert_eq!(t.spans["prepare > activate"], vec![20.0]);
        assert_eq!(t.spans["prepare > activate (self)"], vec![7.5]);
        assert_eq!(t.spans["prepare (self)"], vec![1480.0]);
        assert_eq!(t.spans.len(), 5, "{:?}", t.spans);
    }
}
