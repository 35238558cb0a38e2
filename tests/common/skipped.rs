//! Skipped tests, counted. A test that cannot run here says `SKIPPED <test>: <why>`, but
//! libtest shows a passing test's output only with `--nocapture`, so a suite that skipped
//! half its tests would look like a green run. The first skip registers an exit hook that
//! prints, after libtest's own summary, how many tests of this binary skipped and which.
//! (Under CI the callers fail instead of skipping: everything must be in place there.)

use std::sync::Mutex;

static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Say that `test` is skipped and why; counted for the summary at exit.
pub fn skipped(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    let mut all = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if all.is_empty() {
        // SAFETY: `summary` is a plain `extern "C" fn` that does not unwind.
        unsafe {
            nix::libc::atexit(summary);
        }
    }
    all.push(test.to_string());
}

extern "C" fn summary() {
    let all = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "\nSKIPPED {} test(s) of this suite (run with --nocapture for the reasons): {}",
        all.len(),
        all.join(", ")
    );
}
