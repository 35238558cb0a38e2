//! Merging documents: later files override earlier ones.
//!
//! Tables merge key by key, at any depth. Any other value, arrays included, is replaced
//! whole: a list is one setting, and appending across files would make it impossible to
//! remove an entry. The exception is `[[stub]]`, one entry per zone: a later entry for a
//! zone replaces the earlier one, a new zone is appended, so a conf.d drop-in can add a
//! stub zone without repeating the others.

use toml::{Table, Value};

use super::value;

/// Merges `over` into `base`.
pub fn merge(base: &mut Table, over: Table) {
    merge_tables(base, over, true);
}

fn merge_tables(base: &mut Table, over: Table, top: bool) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge_tables(b, o, false),
            (Some(Value::Array(b)), Value::Array(o)) if top && key == "stub" => merge_stubs(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn merge_stubs(base: &mut Vec<Value>, over: Vec<Value>) {
    for stub in over {
        match base
            .iter_mut()
            .find(|b| zone_of(b).is_some() && zone_of(b) == zone_of(&stub))
        {
            Some(earlier) => *earlier = stub,
            None => base.push(stub),
        }
    }
}

/// The normalised zone of a `[[stub]]` entry (documents were checked, so it is there).
pub fn zone_of(stub: &Value) -> Option<String> {
    let zone = stub.get("zone")?.as_str()?;
    value::zone(zone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    #[test]
    fn tables_merge_deeply_and_arrays_are_replaced() {
        let mut base = table(
            "[listen]\naddresses = ['10.0.0.1', '10.0.0.2']\nport = 53\n[cache]\ncapacity = 5\n",
        );
        merge(&mut base, table("[listen]\naddresses = ['10.0.0.3']\n"));
        assert_eq!(
            base,
            table("[listen]\naddresses = ['10.0.0.3']\nport = 53\n[cache]\ncapacity = 5\n")
        );
    }

    #[test]
    fn stubs_merge_by_zone() {
        let mut base = table(
            "[[stub]]\nzone = 'a.example'\nservers = ['10.0.0.1']\n[[stub]]\nzone = 'b.example'\nservers = ['10.0.0.2']\n",
        );
        merge(
            &mut base,
            table("[[stub]]\nzone = 'A.Example.'\nservers = ['10.0.0.9']\n[[stub]]\nzone = 'c.example'\nservers = ['10.0.0.3']\n"),
        );
        assert_eq!(
            base,
            table(
                "[[stub]]\nzone = 'A.Example.'\nservers = ['10.0.0.9']\n\
                 [[stub]]\nzone = 'b.example'\nservers = ['10.0.0.2']\n\
                 [[stub]]\nzone = 'c.example'\nservers = ['10.0.0.3']\n"
            )
        );
    }
}
