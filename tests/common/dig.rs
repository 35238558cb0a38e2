//! `dig` (bind9-dnsutils) as a second, independent client: what real tools see.

use std::net::SocketAddr;
use std::process::Command;

/// The parsed output of one dig run.
#[derive(Debug)]
pub struct Dig {
    pub stdout: String,
    pub stderr: String,
    pub exit: Option<i32>,
}

/// `dig @ADDR -p PORT +tries=1 +time=2 ARGS...`
pub fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("run dig (apt-get install bind9-dnsutils)");
    Dig {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        exit: out.status.code(),
    }
}

/// One resource record line of dig's answer section.
#[derive(Debug, Clone, PartialEq)]
pub struct Rr {
    pub name: String,
    pub ttl: u32,
    pub rtype: String,
    pub rdata: String,
}

impl Dig {
    /// "NOERROR", "NXDOMAIN", ... from the `->>HEADER<<-` line.
    pub fn status(&self) -> Option<String> {
        let line = self.stdout.lines().find(|l| l.contains("->>HEADER<<-"))?;
        let s = line.split("status: ").nth(1)?;
        Some(s.split(',').next()?.trim().to_string())
    }

    /// Header flags, e.g. ["qr", "rd", "ra"].
    pub fn flags(&self) -> Vec<String> {
        self.stdout
            .lines()
            .find(|l| l.starts_with(";; flags:"))
            .and_then(|l| {
                l.trim_start_matches(";; flags:")
                    .split(';')
                    .next()
                    .map(str::to_string)
            })
            .map(|f| f.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn section(&self, title: &str) -> Vec<Rr> {
        let mut out = Vec::new();
        let mut inside = false;
        for l in self.stdout.lines() {
            if l.starts_with(";; ") && l.contains("SECTION:") {
                inside = l.contains(title);
                continue;
            }
            if inside {
                if l.trim().is_empty() {
                    inside = false;
                    continue;
                }
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() >= 5 {
                    out.push(Rr {
                        name: f[0].to_string(),
                        ttl: f[1].parse().unwrap_or(u32::MAX),
                        rtype: f[3].to_string(),
                        rdata: f[4..].join(" "),
                    });
                }
            }
        }
        out
    }

    pub fn answers(&self) -> Vec<Rr> {
        self.section("ANSWER SECTION")
    }

    pub fn authority(&self) -> Vec<Rr> {
        self.section("AUTHORITY SECTION")
    }

    /// dig printed that it got TC=1 over UDP and retried over TCP.
    pub fn retried_over_tcp(&self) -> bool {
        self.stdout.contains("Truncated, retrying in TCP mode")
    }

    /// The final answer came over TCP (`;; SERVER: ... (TCP)`).
    pub fn answered_over_tcp(&self) -> bool {
        self.stdout
            .lines()
            .any(|l| l.starts_with(";; SERVER:") && l.contains("(TCP)"))
    }

    /// `;; MSG SIZE  rcvd: N`
    pub fn msg_size(&self) -> Option<usize> {
        let l = self.stdout.lines().find(|l| l.contains("MSG SIZE"))?;
        l.rsplit(':').next()?.trim().parse().ok()
    }
}
