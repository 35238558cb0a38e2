//! The daemon's side of the systemd contract: readiness and stop notifications.
//! Every call is a no-op when `NOTIFY_SOCKET` is not set, so localdns runs fine without
//! systemd (tests set `NOTIFY_SOCKET` themselves to wait for readiness).

use sd_notify::NotifyState;

/// Tell systemd every listener is bound and serving.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tell systemd a stop has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
