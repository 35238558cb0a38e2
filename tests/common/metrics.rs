//! Scrape localdns's HTTP endpoint with a plain HTTP/1.0 GET and parse the Prometheus text.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// (status code, body) of `GET path`.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

/// Parse the text exposition format (comments and blank lines skipped; timestamps ignored).
pub fn parse(text: &str) -> Metrics {
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('}') {
            Some(end) if line.contains('{') => (&line[..=end], line[end + 1..].trim()),
            _ => match line.split_once(char::is_whitespace) {
                Some((s, r)) => (s, r.trim()),
                None => continue,
            },
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Metrics { samples }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim();
    while let Some((k, after)) = rest.split_once('=') {
        let after = after.trim_start();
        let Some(body) = after.strip_prefix('"') else {
            break;
        };
        let mut val = String::new();
        let mut chars = body.char_indices();
        let mut end = body.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(k.trim().trim_start_matches(',').trim().to_string(), val);
        rest = body[end..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    out
}

impl Metrics {
    /// Sum of every sample of `name` whose labels include all of `labels`; None when no
    /// sample matches (a missing metric is a failure the caller should see, not a zero).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            if labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }

    /// Like `get`, panicking with the scraped names when the metric is absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let names: std::collections::BTreeSet<_> =
                self.samples.iter().map(|s| s.name.as_str()).collect();
            panic!("metric {name}{labels:?} not exported; have {names:?}")
        })
    }
}

/// Scrape `/metrics`.
pub fn scrape(addr: SocketAddr) -> Metrics {
    let (code, body) =
        http_get(addr, "/metrics").unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
    assert_eq!(code, 200, "GET /metrics answered {code}: {body}");
    parse(&body)
}
