//! Which fields of `event.data` a rule reads, found in its compiled expressions, so
//! a fact's CEL context converts only those (a USB or file event's data is large and
//! most rules read two or three of its fields).
//!
//! Conservative by construction: any use of `event` or `event.data` other than
//! selecting a named field (`event.data.size()`, `"x" in event.data`,
//! `event.data["x"]`, passing `event` to a function) means the whole data is read.

use std::collections::BTreeSet;

use cel::common::ast::{EntryExpr, Expr};
use cel::IdedExpr;

/// The fields of `event.data` some rules read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataFields {
    /// All of it.
    All,
    /// Only these top-level fields (empty: none).
    Only(BTreeSet<String>),
}

impl Default for DataFields {
    fn default() -> Self {
        DataFields::Only(BTreeSet::new())
    }
}

impl DataFields {
    /// What either reads.
    pub fn union(&mut self, other: &DataFields) {
        match (&mut *self, other) {
            (DataFields::All, _) => {}
            (_, DataFields::All) => *self = DataFields::All,
            (DataFields::Only(a), DataFields::Only(b)) => a.extend(b.iter().cloned()),
        }
    }

    /// Whether `field` is read.
    pub fn reads(&self, field: &str) -> bool {
        match self {
            DataFields::All => true,
            DataFields::Only(names) => names.contains(field),
        }
    }

    fn add(&mut self, field: &str) {
        if let DataFields::Only(names) = self {
            names.insert(field.to_string());
        }
    }

    /// What `expr` reads of `event.data`, added to `self`.
    pub fn note(&mut self, expr: &IdedExpr) {
        match &expr.expr {
            Expr::Select(select) => {
                if let Expr::Select(inner) = &select.operand.expr {
                    if inner.field == "data" && is_event(&inner.operand) {
                        // event.data.FIELD (has(event.data.FIELD) too).
                        self.add(&select.field);
                        return;
                    }
                }
                if is_event(&select.operand) {
                    // event.kind, event.id …: only `event.data` as a whole is all.
                    if select.field == "data" {
                        *self = DataFields::All;
                    }
                    return;
                }
                self.note(&select.operand);
            }
            Expr::Ident(name) => {
                if name == "event" {
                    *self = DataFields::All;
                }
            }
            Expr::Literal(_) | Expr::Unspecified => {}
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    self.note(target);
                }
                call.args.iter().for_each(|a| self.note(a));
            }
            Expr::Comprehension(c) => {
                for e in [
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ] {
                    self.note(e);
                }
            }
            Expr::List(list) => list.elements.iter().for_each(|e| self.note(e)),
            Expr::Map(map) => map.entries.iter().for_each(|e| self.note_entry(&e.expr)),
            Expr::Struct(s) => s.entries.iter().for_each(|e| self.note_entry(&e.expr)),
        }
    }

    fn note_entry(&mut self, entry: &EntryExpr) {
        match entry {
            EntryExpr::StructField(f) => self.note(&f.value),
            EntryExpr::MapEntry(m) => {
                self.note(&m.key);
                self.note(&m.value);
            }
        }
    }
}

fn is_event(expr: &IdedExpr) -> bool {
    matches!(&expr.expr, Expr::Ident(name) if name == "event")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(source: &str) -> DataFields {
        let program = cel::Program::compile(source).unwrap();
        let mut fields = DataFields::default();
        fields.note(program.expression());
        fields
    }

    fn only(names: &[&str]) -> DataFields {
        DataFields::Only(names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn named_fields_are_read_and_nothing_else() {
        assert_eq!(read("event.kind == 'usb.attached'"), only(&[]));
        assert_eq!(
            read("event.data.vid == '0951' && has(event.data.serial)"),
            only(&["serial", "vid"])
        );
        assert_eq!(
            read("event.data.interfaces.exists(i, i.class == 8) && agent.id != ''"),
            only(&["interfaces"])
        );
        assert_eq!(
            read("[event.data.a, {'k': event.data.b}].size() > 0"),
            only(&["a", "b"])
        );
    }

    #[test]
    fn any_other_use_of_the_data_or_the_event_reads_all_of_it() {
        for source in [
            "event.data.size() > 3",
            "'serial' in event.data",
            "event.data['serial'] == 'x'",
            "string(event) != ''",
            "[event][0].data.vid == 'x'",
        ] {
            assert_eq!(read(source), DataFields::All, "{source}");
        }
    }

    #[test]
    fn union_is_all_once_one_side_is_all() {
        let mut a = only(&["x"]);
        a.union(&only(&["y"]));
        assert_eq!(a, only(&["x", "y"]));
        a.union(&DataFields::All);
        assert_eq!(a, DataFields::All);
        assert!(a.reads("anything"));
        assert!(!only(&["x"]).reads("y"));
    }
}
