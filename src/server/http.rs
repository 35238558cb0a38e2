//! The HTTP endpoint: `/metrics` (Prometheus text), `/health` (200 while serving).
//! Hand-written on purpose: two read-only GET routes do not justify an HTTP stack.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::resolve::Resolver;

pub async fn serve(listener: TcpListener, resolver: Arc<Resolver>) {
    loop {
        let mut stream = super::accept(&listener, "HTTP").await;
        let resolver = Arc::clone(&resolver);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            // Read until the end of the request head (or the buffer is full).
            while n < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[n..])).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(m)) => n += m,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].ends_with(b"\n\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match (head.starts_with("GET "), path) {
                (true, "/metrics") => ("200 OK", metrics_text(&resolver)),
                (true, "/health") => ("200 OK", "ok\n".to_string()),
                (true, _) => ("404 Not Found", "not found\n".to_string()),
                (false, _) => ("405 Method Not Allowed", "GET only\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

pub fn metrics_text(resolver: &Resolver) -> String {
    resolver.metrics.render(&[
        (
            "localdns_cache_entries",
            "Entries in the cache, fresh and stale.",
            resolver.cache.len() as u64,
        ),
        (
            "localdns_upstream_in_flight",
            "Keys being resolved upstream now.",
            resolver.in_flight() as u64,
        ),
    ])
}
