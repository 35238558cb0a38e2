//! Placeholder binary; the real CLI lives on the main branch.

fn main() {
    let source = localdns::config::Source::default();
    match localdns::config::load(&source) {
        Ok(config) => print!("{}", localdns::config::render(&config)),
        Err(e) => {
            eprintln!("localdns: {e}");
            std::process::exit(64);
        }
    }
}
