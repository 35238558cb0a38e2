//! Running a helper program (iptables, systemctl) with a bound on its run time, so that a
//! hung tool fails the operation instead of hanging the daemon or the boot.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `(exit code, stdout, stderr)`, or `None` when killed at the time limit. A death by
/// signal counts as exit code 128 + signal.
pub fn run_bounded(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
) -> std::io::Result<Option<(i32, String, String)>> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small inputs (a few KiB); a failed write shows up in the exit status.
        let _ = pipe.write_all(input.as_bytes());
    }
    // Read both pipes on threads: a big save output must not block the child.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait()? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(status.map(|s| {
        use std::os::unix::process::ExitStatusExt;
        let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
        (code, stdout, stderr)
    }))
}
