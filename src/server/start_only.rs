//! A reload that changes start-only settings (`[listen]`, `[network]`, `[metrics]`,
//! [`crate::config::start_only_changes`]) is checked against the node when it arrives: the
//! interface must be absent or ours, a listen address must be one this node can hold, and
//! an address:port no other program holds. A change that cannot work is refused with the
//! reason, like a bad file, while the running config keeps serving; one that can is
//! accepted and reported as "restart required" until the process restarts with it.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};

use crate::config::Config;

/// Why `file`'s start-only settings would fail at the next start on this node, checked
/// against what the `running` process holds (its own sockets and link are not "held by
/// another program").
pub async fn check(running: &Config, file: &Config) -> Result<(), String> {
    let net = &file.network;
    if net.setup_interface && net.interface != running.network.interface {
        crate::node::check_link(&net.interface)
            .await
            .map_err(|e| format!("network.interface = {:?}: {e}", net.interface))?;
    }
    let ours = |a: SocketAddr| {
        running.listen.port == a.port() && running.listen.addresses.contains(&a.ip())
    };
    for ip in &file.listen.addresses {
        let at = SocketAddr::new(*ip, file.listen.port);
        if ours(at) {
            continue;
        }
        match holdable(*ip) {
            // Not on the node yet: setup adds it to the link, or it cannot be had.
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                if !net.setup_interface {
                    return Err(format!(
                        "listen.addresses: {ip} is not an address of this node and \
                         network.setup_interface = false: nothing would add it"
                    ));
                }
            }
            Err(e) => return Err(format!("listen.addresses: {ip}: {e}")),
            Ok(()) => free(at, true).map_err(|e| format!("listen: {at}: {e}"))?,
        }
    }
    for entry in &file.metrics.addresses {
        // An interface's addresses are read at the start; only a plain address can be
        // tried here.
        let Some(at) = entry.socket() else { continue };
        if !running.metrics.addresses.contains(entry) {
            free(at, false).map_err(|e| format!("metrics.address = \"{at}\": {e}"))?;
        }
    }
    Ok(())
}

/// Is `ip` an address of this node (bindable on an ephemeral port)?
fn holdable(ip: IpAddr) -> io::Result<()> {
    UdpSocket::bind(SocketAddr::new(ip, 0)).map(drop)
}

/// Can `at` be bound now (TCP, and UDP for a listen address)? Bound and closed again at
/// once; the error names a holder when the address is in use.
fn free(at: SocketAddr, udp: bool) -> Result<(), String> {
    let describe = |e: io::Error| match e.kind() {
        io::ErrorKind::AddrInUse => "another program holds it".to_owned(),
        io::ErrorKind::AddrNotAvailable => "not an address of this node".to_owned(),
        _ => e.to_string(),
    };
    TcpListener::bind(at).map(drop).map_err(describe)?;
    if udp {
        UdpSocket::bind(at).map(drop).map_err(describe)?;
    }
    Ok(())
}

/// The log line and status text of accepted start-only changes.
pub fn describe(changes: &[String]) -> String {
    format!(
        "restart required: {} (applied at the next `systemctl restart localdns`, which keeps \
         the sockets)",
        changes.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_documents, Environment};
    use std::path::PathBuf;

    fn load(text: &str) -> Config {
        let base = "[upstream]\nservers = [\"10.0.0.2\"]\n[network]\nsetup_interface = false\nsetup_rules = false\n";
        let docs = vec![(
            PathBuf::from("/etc/localdns/config.toml"),
            format!("{base}{text}"),
        )];
        load_documents(&docs, &Environment::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn run(running: &Config, file: &Config) -> Result<(), String> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check(running, file))
    }

    #[test]
    fn a_port_held_by_another_program_is_refused() {
        let holder = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let listen = "[listen]\naddresses = [\"127.0.0.1\"]\nport = 5399\n";
        let running = load(listen);
        let file = load(&format!(
            "{listen}[metrics]\naddress = \"127.0.0.1:{port}\"\n"
        ));
        let why = run(&running, &file).unwrap_err();
        assert!(why.contains("another program holds it"), "{why}");
        drop(holder);
        assert_eq!(run(&running, &file), Ok(()), "free once the holder is gone");
    }

    #[test]
    fn an_address_nothing_would_add_is_refused() {
        let running = load("[listen]\naddresses = [\"127.0.0.1\"]\nport = 5398\n");
        let file = load("[listen]\naddresses = [\"192.0.2.53\"]\nport = 5398\n");
        let why = run(&running, &file).unwrap_err();
        assert!(
            why.contains("192.0.2.53 is not an address of this node"),
            "{why}"
        );
    }

    #[test]
    fn the_running_processs_own_sockets_are_not_a_conflict() {
        let held = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let running = load(&format!(
            "[listen]\naddresses = [\"127.0.0.1\"]\nport = {port}\n"
        ));
        let file = load(&format!(
            "[listen]\naddresses = [\"127.0.0.1\"]\nport = {port}\nudp_threads = 1\n"
        ));
        assert_eq!(run(&running, &file), Ok(()));
    }
}
