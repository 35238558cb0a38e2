//! Which exposition format a scraper gets, and the Prometheus text format 0.0.4 form of
//! what [`super::expose`] writes.
//!
//! `prometheus-client` writes OpenMetrics only. Prometheus asks for OpenMetrics first (its
//! `Accept` lists `application/openmetrics-text` at q=0.5 or more, `text/plain` lower), but
//! other scrapers (the Datadog and New Relic agents, Telegraf, older Prometheus, `curl`)
//! ask for `text/plain` or send no preference, and some reject `# EOF` or read a counter's
//! `# TYPE` line wrongly when it names the family without `_total`. So the choice follows
//! the `Accept` header with its q-values (RFC 9110 12.5.1: the most specific range that
//! matches a format gives its q; equal q goes to the range the client listed first), and
//! anything without a clear wish for OpenMetrics gets text 0.0.4, as client_golang does.

use std::collections::HashMap;

/// An exposition format `/metrics` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// (type, subtype, the `version` parameters this format answers).
    fn media(self) -> (&'static str, &'static str, &'static [&'static str]) {
        match self {
            Format::Text => ("text", "plain", &["0.0.4"]),
            // Prometheus asks for 1.0.0 or 0.0.1: the same text for what localdns writes.
            Format::OpenMetrics => ("application", "openmetrics-text", &["1.0.0", "0.0.1"]),
        }
    }
}

/// One media range of an `Accept` header.
#[derive(Debug, PartialEq)]
struct Range {
    kind: String,
    subtype: String,
    version: Option<String>,
    q: f32,
}

/// The ranges of `Accept` header values, in the client's order; a malformed range (no `/`,
/// a q that is not a number from 0 to 1) is left out, as if not sent.
fn ranges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Range> {
    let mut out = Vec::new();
    for value in values {
        for range in value.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let Some((kind, subtype)) = parts.next().and_then(|m| m.split_once('/')) else {
                continue;
            };
            let (mut version, mut q) = (None, Some(1.0f32));
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    "version" => version = Some(v.to_string()),
                    // Parameters after q are accept-extensions: none of them matter here.
                    "q" => {
                        q = v.parse().ok().filter(|q| (0.0..=1.0).contains(q));
                        break;
                    }
                    _ => {}
                }
            }
            let Some(q) = q else { continue };
            out.push(Range {
                kind: kind.trim().to_ascii_lowercase(),
                subtype: subtype.trim().to_ascii_lowercase(),
                version,
                q,
            });
        }
    }
    out
}

/// How specifically `range` names `format` (higher is more specific), if it matches.
fn specificity(range: &Range, format: Format) -> Option<u8> {
    let (kind, subtype, versions) = format.media();
    match (range.kind.as_str(), range.subtype.as_str()) {
        ("*", "*") => Some(0),
        (k, "*") if k == kind => Some(1),
        (k, s) if k == kind && s == subtype => match &range.version {
            None => Some(2),
            Some(v) if versions.contains(&v.as_str()) => Some(3),
            Some(_) => None,
        },
        _ => None,
    }
}

/// The format for a request with these `Accept` header values (none at all: text).
pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Format {
    let ranges = ranges(accept);
    // (q, specificity, earlier is better) of the range that decides for each format.
    let score = |format: Format| {
        let mut best: Option<(u8, usize)> = None;
        for (i, r) in ranges.iter().enumerate() {
            if let Some(s) = specificity(r, format) {
                if best.map_or(true, |(b, _)| s > b) {
                    best = Some((s, i));
                }
            }
        }
        best.map(|(s, i)| (ranges[i].q, s, usize::MAX - i))
            .filter(|(q, _, _)| *q > 0.0)
    };
    match (score(Format::OpenMetrics), score(Format::Text)) {
        (Some(om), Some(text)) if om.partial_cmp(&text) == Some(std::cmp::Ordering::Greater) => {
            Format::OpenMetrics
        }
        (Some(_), None) => Format::OpenMetrics,
        _ => Format::Text,
    }
}

/// The text format 0.0.4 form of an OpenMetrics exposition as `prometheus-client` writes
/// it: a counter's `# HELP` and `# TYPE` name its `_total` sample, `unknown` is `untyped`,
/// the types 0.0.4 does not have (info, stateset, gaugehistogram) lose their metadata (their
/// samples stay, untyped), and `# UNIT`, `# EOF`, `_created` samples and exemplars go.
/// Sample lines are otherwise the same in both formats (prometheus-client writes no
/// timestamps, the one other difference).
pub fn to_text(openmetrics: &str) -> String {
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let (keyword, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = types.get(name).copied().unwrap_or("unknown");
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            let tail = match (keyword, kind) {
                ("HELP", "counter" | "gauge" | "histogram" | "summary" | "unknown") => tail,
                ("TYPE", "counter" | "gauge" | "histogram" | "summary") => kind,
                ("TYPE", "unknown") => "untyped",
                _ => continue,
            };
            out.push_str(&format!("# {keyword} {name} {tail}\n"));
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let labels_end = sample_name_and_labels(line);
        let name = &line[..line[..labels_end].find('{').unwrap_or(labels_end)];
        let created = name.strip_suffix("_created").is_some_and(|family| {
            matches!(
                types.get(family),
                Some(&"counter" | &"histogram" | &"summary")
            )
        });
        if created {
            continue;
        }
        let sample = match line[labels_end..].find(" # ") {
            Some(at) => &line[..labels_end + at],
            None => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Where a sample line's name and label set end (label values may hold ` # ` and `}`).
fn sample_name_and_labels(line: &str) -> usize {
    let Some(open) = line.find(['{', ' ']) else {
        return line.len();
    };
    if line.as_bytes()[open] == b' ' {
        return open;
    }
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return open + i + 1,
            _ => {}
        }
    }
    line.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Accept header Prometheus 2.x sends by default.
    const PROMETHEUS_2: &str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    /// Prometheus 3.x (UTF-8 escaping parameters, text 1.0.0, protobuf left out by default).
    const PROMETHEUS_3: &str = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";

    fn pick(accept: &[&str]) -> Format {
        negotiate(accept.iter().copied())
    }

    #[test]
    fn prometheus_gets_openmetrics_and_plain_scrapers_get_text() {
        assert_eq!(pick(&[PROMETHEUS_2]), Format::OpenMetrics);
        assert_eq!(pick(&[PROMETHEUS_3]), Format::OpenMetrics);
        assert_eq!(pick(&[]), Format::Text);
        assert_eq!(pick(&["*/*"]), Format::Text);
        assert_eq!(pick(&["text/plain"]), Format::Text);
        assert_eq!(pick(&["text/plain;version=0.0.4"]), Format::Text);
        assert_eq!(pick(&["text/*"]), Format::Text);
        assert_eq!(pick(&["application/openmetrics-text"]), Format::OpenMetrics);
        assert_eq!(pick(&["application/*"]), Format::OpenMetrics);
        assert_eq!(
            pick(&["Application/OpenMetrics-Text; Version=\"1.0.0\""]),
            Format::OpenMetrics
        );
    }

    #[test]
    fn q_values_decide_and_equal_ones_go_to_the_first_listed() {
        // A scraper that prefers text while accepting OpenMetrics.
        assert_eq!(
            pick(&[
                "application/openmetrics-text;version=1.0.0;q=0.3,text/plain;version=0.0.4;q=0.5"
            ]),
            Format::Text
        );
        assert_eq!(
            pick(&["text/plain;q=0.2", "application/openmetrics-text;q=0.9"]),
            Format::OpenMetrics
        );
        assert_eq!(
            pick(&["application/openmetrics-text, text/plain"]),
            Format::OpenMetrics
        );
        assert_eq!(
            pick(&["text/plain, application/openmetrics-text"]),
            Format::Text
        );
        // q=0 is "not acceptable"; the most specific range gives the q.
        assert_eq!(
            pick(&["application/openmetrics-text;q=0, */*"]),
            Format::Text
        );
        assert_eq!(
            pick(&["text/plain;q=0, application/openmetrics-text;q=0.1"]),
            Format::OpenMetrics
        );
        assert_eq!(
            pick(&["*/*;q=0.9, application/openmetrics-text;q=0.1"]),
            Format::Text
        );
        // An accept-extension after q is not a media type parameter.
        assert_eq!(
            pick(&["application/openmetrics-text;q=0.9;version=9,text/plain;q=0.5"]),
            Format::OpenMetrics
        );
    }

    #[test]
    fn versions_and_formats_localdns_does_not_write_fall_back_to_text() {
        assert_eq!(
            pick(&["application/openmetrics-text;version=2.0.0"]),
            Format::Text
        );
        assert_eq!(
            pick(&["application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"]),
            Format::Text
        );
        assert_eq!(pick(&["application/json"]), Format::Text);
        assert_eq!(
            pick(&["text/plain;version=1.0.0;q=0.9,application/openmetrics-text;q=0.1"]),
            Format::OpenMetrics
        );
    }

    #[test]
    fn malformed_ranges_are_ignored_never_a_panic() {
        for junk in [
            "",
            ",,,",
            ";",
            "application/openmetrics-text;q=abc",
            "application/openmetrics-text;q=2",
            "application/openmetrics-text;q=-1",
            "application/openmetrics-text;q=NaN",
            "/",
            "garbage",
            "\u{1F600}/\u{1F600};q=\u{1F600}",
        ] {
            assert_eq!(pick(&[junk]), Format::Text, "{junk:?}");
        }
        // Parameters without a value are ignored, not the range.
        assert_eq!(
            pick(&["application/openmetrics-text;=;q"]),
            Format::OpenMetrics
        );
        assert_eq!(
            pick(&["garbage, application/openmetrics-text;q=x, application/openmetrics-text;q=0.4, text/plain;q=0.3"]),
            Format::OpenMetrics
        );
    }

    #[test]
    fn the_content_types_are_what_each_format_says_it_is() {
        assert_eq!(
            Format::Text.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(
            Format::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
    }

    #[test]
    fn text_names_counters_with_total_and_drops_openmetrics_only_lines() {
        let om = "# HELP coredns_dns_requests Counter of DNS requests.\n\
                  # TYPE coredns_dns_requests counter\n\
                  coredns_dns_requests_total{server=\"dns://a:53\",type=\"A\"} 3\n\
                  coredns_dns_requests_created{server=\"dns://a:53\",type=\"A\"} 1700000000.0\n\
                  # HELP localdns_cache_bytes Bytes.\n\
                  # TYPE localdns_cache_bytes gauge\n\
                  # UNIT localdns_cache_bytes bytes\n\
                  localdns_cache_bytes 4096.0\n\
                  # HELP d Durations.\n\
                  # TYPE d histogram\n\
                  d_sum{zone=\".\"} 0.5\n\
                  d_count{zone=\".\"} 2\n\
                  d_bucket{le=\"+Inf\",zone=\".\"} 2 # {trace=\"x # }\"} 0.4\n\
                  # HELP odd Something.\n\
                  # TYPE odd unknown\n\
                  odd 1\n\
                  # HELP build Build.\n\
                  # TYPE build info\n\
                  build_info{version=\"1\"} 1\n\
                  # HELP e Label with a hash.\n\
                  # TYPE e counter\n\
                  e_total{l=\"a # b\"} 2 # {id=\"1\"} 1.0\n\
                  # EOF\n";
        let want = "# HELP coredns_dns_requests_total Counter of DNS requests.\n\
                    # TYPE coredns_dns_requests_total counter\n\
                    coredns_dns_requests_total{server=\"dns://a:53\",type=\"A\"} 3\n\
                    # HELP localdns_cache_bytes Bytes.\n\
                    # TYPE localdns_cache_bytes gauge\n\
                    localdns_cache_bytes 4096.0\n\
                    # HELP d Durations.\n\
                    # TYPE d histogram\n\
                    d_sum{zone=\".\"} 0.5\n\
                    d_count{zone=\".\"} 2\n\
                    d_bucket{le=\"+Inf\",zone=\".\"} 2\n\
                    # HELP odd Something.\n\
                    # TYPE odd untyped\n\
                    odd 1\n\
                    build_info{version=\"1\"} 1\n\
                    # HELP e_total Label with a hash.\n\
                    # TYPE e_total counter\n\
                    e_total{l=\"a # b\"} 2\n";
        assert_eq!(to_text(om), want);
    }

    #[test]
    fn text_of_odd_input_is_never_a_panic() {
        for junk in [
            "",
            "#",
            "# ",
            "# TYPE",
            "# TYPE x",
            "# HELP",
            "x{",
            "x{\"",
            "x{a=\"\\",
            "{}",
            " # ",
            "\u{1F600}{\u{1F600}=\"\u{1F600}\"} 1 # {}",
        ] {
            let _ = to_text(junk);
        }
        assert_eq!(to_text("x{a=\"}\"} 1\n"), "x{a=\"}\"} 1\n");
    }
}
