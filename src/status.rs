//! `localdns status`: ask the running daemon how it is, on the HTTP endpoint it already
//! serves (`GET /status`, JSON), and check from outside that each listen address answers a
//! real query now.
//!
//! Why the HTTP endpoint rather than a unix socket in `$RUNTIME_DIRECTORY`: it is one door
//! for Prometheus, probes and people, so what `status` says is what the dashboards see;
//! it needs no root (the unit's runtime directory is root-only) and no second listener
//! to keep alive across restarts; the report holds nothing secret. The address comes from
//! the same config loader the daemon uses (`metrics.address`), or `--address`.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::health::Report;

/// How long the daemon has to answer `/status`, and each listen address a query.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why `status` could not tell.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no localdns daemon answers on http://{0}/status ({1}); is it running? see `systemctl status localdns` and `journalctl -u localdns`")]
    NoDaemon(SocketAddr, String),
    #[error("metrics.address is empty in the config: the daemon serves no endpoint to ask (give --address)")]
    NoEndpoint,
    #[error("http://{0}/status: {1}")]
    BadAnswer(SocketAddr, String),
}

/// One listen address checked with a real query.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub address: String,
    /// The answer's RCODE and how long it took, or why there was none.
    pub result: Result<(String, f64), String>,
}

/// The daemon's report and the probes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub daemon: Report,
    pub probes: Vec<Probe>,
}

impl Status {
    /// Why the node's DNS is not healthy; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.daemon.reasons.clone();
        if !self.daemon.healthy && p.is_empty() {
            p.push("not healthy".into());
        }
        for probe in &self.probes {
            if let Err(e) = &probe.result {
                p.push(format!("{} does not answer: {e}", probe.address));
            }
        }
        p
    }
}

/// The address to ask among `metrics.address`'s entries: the first plain one (a
/// loopback one before any other), else the first an interface's addresses give.
pub fn endpoint_of(entries: &[crate::config::HttpAddress]) -> Option<SocketAddr> {
    let plain: Vec<SocketAddr> = entries.iter().filter_map(|e| e.socket()).collect();
    plain
        .iter()
        .find(|a| a.ip().is_loopback())
        .or(plain.first())
        .copied()
        .or_else(|| {
            entries.iter().find_map(|e| {
                crate::server::http::listen::resolve(e)
                    .ok()?
                    .first()
                    .copied()
            })
        })
}

/// GET `/status` from the daemon at `addr`.
pub fn ask(addr: SocketAddr) -> Result<Report, StatusError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StatusError::NoDaemon(addr, e.to_string()))?;
    let body = runtime.block_on(async {
        tokio::time::timeout(ASK_TIMEOUT, get(addr, "/status"))
            .await
            .unwrap_or_else(|_| Err(StatusError::NoDaemon(addr, "no answer within 3 s".into())))
    })?;
    serde_json::from_slice(&body).map_err(|e| StatusError::BadAnswer(addr, e.to_string()))
}

async fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, StatusError> {
    let no = |e: &dyn std::fmt::Display| StatusError::NoDaemon(addr, e.to_string());
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| no(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| no(&e))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| StatusError::BadAnswer(addr, e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| no(&e))?;
    if !resp.status().is_success() {
        return Err(StatusError::BadAnswer(
            addr,
            format!("HTTP {}", resp.status()),
        ));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| StatusError::BadAnswer(addr, e.to_string()))?;
    Ok(body.to_bytes().to_vec())
}

/// Ask `address` (`IP:PORT`) for `. NS` over UDP: any answer with our ID counts.
pub fn probe(address: &str) -> Probe {
    let result = (|| {
        let to: SocketAddr = address.parse().map_err(|e| format!("{e}"))?;
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(PROBE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let id: u16 = rand::random();
        let mut q = Vec::with_capacity(17);
        q.extend_from_slice(&id.to_be_bytes());
        q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1]);
        let started = Instant::now();
        sock.send_to(&q, to).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        loop {
            let (n, from) = sock.recv_from(&mut buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("no answer within {PROBE_TIMEOUT:?}")
                }
                _ => e.to_string(),
            })?;
            if from == to && n >= 12 && buf[..2] == id.to_be_bytes() {
                let rcode = crate::metrics::stats::RCODES[usize::from(buf[3] & 0x0f)];
                return Ok((rcode.to_string(), started.elapsed().as_secs_f64() * 1000.0));
            }
        }
    })();
    Probe {
        address: address.to_string(),
        result,
    }
}

/// The report as a person reads it.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let d = &s.daemon;
    let mut o = String::new();
    let problems = s.problems();
    let verdict = if problems.is_empty() {
        "healthy and ready".to_string()
    } else {
        format!("NOT OK: {}", problems.join("; "))
    };
    let _ = writeln!(o, "localdns {}: {verdict}", d.version);
    let _ = writeln!(
        o,
        "  uptime:     {}",
        humantime::format_duration(Duration::from_secs(d.uptime_secs))
    );
    let c = &d.config;
    let _ = writeln!(
        o,
        "  config:     {} (generation {})",
        c.files.join(", "),
        c.generation
    );
    let reload = match (c.last_reload_time, c.last_reload_ok) {
        (0, _) => "none since the start".to_string(),
        (t, ok) => format!(
            "{} {}s ago",
            if ok { "accepted" } else { "REFUSED" },
            crate::metrics::unix_now().saturating_sub(t)
        ),
    };
    let _ = writeln!(o, "  last reload: {reload}");
    if let Some(r) = &c.refused {
        let _ = writeln!(
            o,
            "  CONFIG REFUSED ({} serving): {r}",
            if c.last_good {
                "last good config"
            } else {
                "previous config"
            }
        );
    }
    if !c.restart_required.is_empty() {
        let _ = writeln!(
            o,
            "  RESTART REQUIRED: {} (the files change settings applied only at a start)",
            c.restart_required.join("; ")
        );
    }
    for p in &s.probes {
        let _ = match &p.result {
            Ok((rcode, ms)) => writeln!(
                o,
                "  listen:     {} answers ({rcode} in {ms:.1} ms)",
                p.address
            ),
            Err(e) => writeln!(o, "  listen:     {} DOES NOT ANSWER: {e}", p.address),
        };
    }
    if !d.endpoint.is_empty() && d.endpoint != "listening" {
        let _ = writeln!(o, "  endpoint:   {}", d.endpoint);
    }
    let _ = writeln!(o, "  link:       {}", d.link);
    let _ = writeln!(o, "  rules:      {}", d.rules);
    let _ = writeln!(
        o,
        "  cache:      {} entries ({} KiB), hit ratio {:.1}% ({} hits, {} misses)",
        d.cache.entries,
        d.cache.bytes / 1024,
        d.cache.hit_ratio * 100.0,
        d.cache.hits,
        d.cache.misses
    );
    for u in &d.upstreams {
        let _ = writeln!(
            o,
            "  upstream:   {} ({}) {}, {} queries, {} failed, mean {:.1} ms{}",
            u.server,
            u.pool,
            if u.up { "up" } else { "DOWN" },
            u.requests,
            u.failures,
            u.mean_latency_ms,
            u.last_error
                .as_ref()
                .map_or(String::new(), |e| format!(", last error: {e}"))
        );
    }
    for h in &d.held_back {
        let _ = writeln!(
            o,
            "  held back:  client {}: {} queries over its miss budget, the last {}s ago",
            h.client, h.queries, h.last_secs_ago
        );
    }
    if d.repairs.is_empty() {
        let _ = writeln!(o, "  repairs:    none");
    }
    for r in &d.repairs {
        let _ = writeln!(
            o,
            "  repaired:   {}s ago: {}",
            crate::metrics::unix_now().saturating_sub(r.time),
            r.what
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_the_reasons_and_silent_addresses() {
        let mut s = Status {
            daemon: Report {
                healthy: true,
                ready: true,
                ..Report::default()
            },
            probes: vec![Probe {
                address: "127.0.0.1:53".into(),
                result: Ok(("NOERROR".into(), 1.0)),
            }],
        };
        assert!(s.problems().is_empty());
        assert!(render(&s).contains("healthy and ready"));
        s.daemon.reasons = vec!["cluster upstream: none of 1 server(s) up".into()];
        s.probes[0].result = Err("no answer within 2s".into());
        let p = s.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(render(&s).contains("NOT OK: cluster upstream"));
    }
}
