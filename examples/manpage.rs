//! Writes the man page `localdns(8)` (roff) to stdout, rendered from the clap definition in
//! `localdns::cli`, so the page is never edited by hand and cannot drift from the binary.
//! `packaging/build` runs it for every package:
//!
//!     cargo run --quiet --example manpage > localdns.8
//!
//! An example rather than a subcommand: clap_mangen stays a dev-dependency and out of the
//! shipped binary. One page for everything: clap_mangen's own subcommand section points at
//! a page per subcommand (`localdns-run(8)`...), so the subcommands and their options are
//! rendered here into a COMMANDS section instead.

use std::io::Write;

use clap::CommandFactory;
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;
use localdns::cli::Cli;

fn main() -> std::io::Result<()> {
    let page = render()?;
    std::io::stdout().lock().write_all(&page)
}

/// The whole page.
fn render() -> std::io::Result<Vec<u8>> {
    let mut cmd = Cli::command();
    cmd.build();
    let man = Man::new(cmd.clone())
        .section("8")
        .manual("System Administration");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    commands(&cmd).to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(once_preamble(&out))
}

/// Each piece rendered alone starts with roff's two-line preamble (defining the apostrophe
/// string); the page needs it once, at the top.
fn once_preamble(page: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let preamble = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";
    let body = text.replace(preamble, "");
    if text.starts_with(preamble) {
        format!("{preamble}{body}").into_bytes()
    } else {
        body.into_bytes()
    }
}

/// COMMANDS: per subcommand a subsection with its usage, its description and its options.
fn commands(cmd: &clap::Command) -> Roff {
    let mut roff = Roff::default();
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        roff.control(
            "SS",
            [format!("{} {}", cmd.get_name(), sub.get_name()).as_str()],
        );
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            roff.text([roman(about.to_string())]);
        }
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let mut header = Vec::new();
            if let Some(short) = arg.get_short() {
                header.extend([bold(format!("-{short}")), roman(", ")]);
            }
            if let Some(long) = arg.get_long() {
                header.push(bold(format!("--{long}")));
            }
            if arg.get_action().takes_values() {
                for name in arg.get_value_names().unwrap_or_default() {
                    header.extend([roman(" "), italic(format!("<{name}>"))]);
                }
            }
            roff.control("TP", []);
            roff.text(header);
            if let Some(help) = arg.get_long_help().or_else(|| arg.get_help()) {
                roff.text([roman(help.to_string())]);
            }
        }
    }
    roff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page documents every subcommand and every option of each, and says `localdns`.
    #[test]
    fn every_subcommand_and_option_is_on_the_page() {
        let page = String::from_utf8(render().unwrap()).unwrap();
        assert!(page.contains("\n.TH localdns 8 "), "{page}");
        assert_eq!(page.matches(".ds Aq").count(), 2, "{page}");
        for sub in Cli::command().get_subcommands() {
            let heading = format!(".SS \"localdns {}\"", sub.get_name());
            assert!(page.contains(&heading), "no {heading} in\n{page}");
            for long in sub.get_arguments().filter_map(|a| a.get_long()) {
                // roff escapes the dashes of option names.
                let escaped = format!("\\-\\-{}", long.replace('-', "\\-"));
                assert!(page.contains(&escaped), "no {escaped} in\n{page}");
            }
        }
    }
}
