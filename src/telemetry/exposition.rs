//! A small `OpenMetrics` text parser for tests: the unit tests of `telemetry` and (through `#[path]` in
//! `tests/support`) the `/metrics` tests of `tests/operations.rs` read the exposition with this one parser.

#![allow(dead_code, reason = "each user takes what it needs")]
#![allow(
    unreachable_pub,
    reason = "shared with the integration tests, whose support makes it a public module"
)]

pub type Labels = Vec<(String, String)>;

/// One sample line of the exposition text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        self.labels.len() == want.len() && want.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `key="value",…` up to the closing `}`; returns the labels and the rest after `}`.
fn parse_labels(mut rest: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let key = &rest[..eq];
        if !is_label_name(key) {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by ','".to_owned());
        }
    }
}

/// A small `OpenMetrics` text parser: comments are `# HELP|TYPE|UNIT …`, the last line is `# EOF`, every
/// other line is `name{labels} value` (labels optional) with a float value.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("text does not end with '# EOF'")?;
    let mut samples = Vec::new();
    for line in body.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name) = (words.next(), words.next());
            if !matches!(kind, Some("HELP" | "TYPE" | "UNIT")) || !name.is_some_and(is_metric_name)
            {
                return Err(format!("bad comment line {line:?}"));
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| format!("no value on {line:?}"))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(format!("bad metric name on {line:?}"));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(rest) => parse_labels(rest).map_err(|e| format!("{e} on {line:?}"))?,
            None => (Vec::new(), &line[name_end..]),
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| format!("no space before value on {line:?}"))?;
        let value = value
            .parse::<f64>()
            .map_err(|e| format!("bad value on {line:?}: {e}"))?;
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(samples)
}

/// The value of the sample `name` whose labels are exactly `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.has_labels(labels))
        .map(|s| s.value)
}
