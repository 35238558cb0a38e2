//! Scrape localdns's HTTP endpoint with a plain HTTP/1.0 GET and parse the Prometheus text
//! with a real parser (`prometheus-parse`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// (status code, body) of `GET path`.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    http_get_over(s, addr, path)
}

/// (status code, body) of `GET path` over a connection already made to `addr`.
pub fn http_get_over(
    mut s: TcpStream,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
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

/// Parse the exposition with a real Prometheus text-format parser (`prometheus-parse`);
/// histograms come back as one `NAME_bucket` sample per bound (label `le`).
pub fn parse(text: &str) -> Metrics {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the exposition parses");
    let mut samples = Vec::new();
    for s in scrape.samples {
        let labels: BTreeMap<String, String> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => samples.push(Sample {
                name: s.metric,
                labels,
                value: v,
            }),
            prometheus_parse::Value::Histogram(buckets) => {
                for b in buckets {
                    let mut l = labels.clone();
                    let le = if b.less_than.is_infinite() || b.less_than == f64::MAX {
                        "+Inf".to_string()
                    } else {
                        b.less_than.to_string()
                    };
                    l.insert("le".into(), le);
                    samples.push(Sample {
                        name: format!("{}_bucket", s.metric),
                        labels: l,
                        value: b.count,
                    });
                }
            }
            prometheus_parse::Value::Summary(_) => {}
        }
    }
    Metrics { samples }
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
