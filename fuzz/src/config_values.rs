//! Configurations with every numeric field set to values meant to break them: the edges of the
//! integer and float ranges, zero, negatives, non-finite floats, and seeded random magnitudes.
//! [`numeric_fields`] finds the numbers of a parsed TOML document (tables and arrays, at any
//! depth); [`try_each_value`] sets one field at a time and runs a check on the result, catching a
//! panic and naming the field and the value that caused it. fl-server's and fl-sim's property
//! tests run their whole start-up path through it.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// One step of a path into a TOML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A key of a table.
    Key(String),
    /// An index into an array.
    Index(usize),
}

/// Where a value sits in a document, printed as `server.reconnect_grace_s` or `layers[2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Step>);

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Key(k) if i == 0 => write!(f, "{k}")?,
                Step::Key(k) => write!(f, ".{k}")?,
                Step::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Every integer and float in `doc`, in document order.
pub fn numeric_fields(doc: &toml::Value) -> Vec<FieldPath> {
    fn walk(value: &toml::Value, at: &mut Vec<Step>, out: &mut Vec<FieldPath>) {
        match value {
            toml::Value::Integer(_) | toml::Value::Float(_) => out.push(FieldPath(at.clone())),
            toml::Value::Table(table) => {
                for (key, v) in table {
                    at.push(Step::Key(key.clone()));
                    walk(v, at, out);
                    at.pop();
                }
            }
            toml::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    at.push(Step::Index(i));
                    walk(v, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc, &mut Vec::new(), &mut out);
    out
}

/// The fields of [`numeric_fields`] under one of the top-level tables named in `under` (every
/// field when `under` is empty).
pub fn fields_under(doc: &toml::Value, under: &[&str]) -> Vec<FieldPath> {
    numeric_fields(doc)
        .into_iter()
        .filter(|f| {
            under.is_empty() || matches!(f.0.first(), Some(Step::Key(k)) if under.contains(&k.as_str()))
        })
        .collect()
}

/// The TOML document `base` with the document `over` merged over it: a table of `over` extends
/// the table of the same name key by key, anything else replaces the base's value.
pub fn merged(base: &str, over: &str) -> Result<toml::Value, toml::de::Error> {
    let mut doc: toml::Table = toml::from_str(base)?;
    let over: toml::Table = toml::from_str(over)?;
    for (key, value) in over {
        match (doc.get_mut(&key), value) {
            (Some(toml::Value::Table(table)), toml::Value::Table(more)) => table.extend(more),
            (_, value) => {
                doc.insert(key, value);
            }
        }
    }
    Ok(toml::Value::Table(doc))
}

/// `doc` with the value at `path` replaced by `value`.
pub fn with_value(doc: &toml::Value, path: &FieldPath, value: toml::Value) -> toml::Value {
    let mut doc = doc.clone();
    let mut at = &mut doc;
    for step in &path.0 {
        let next = match (step, at) {
            (Step::Key(k), toml::Value::Table(t)) => t.get_mut(k),
            (Step::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(v) => at = v,
            None => return doc,
        }
    }
    *at = value;
    doc
}

/// The values every field is set to: each integer edge and each float edge, for either type of
/// field (an integer where a float is read is a valid TOML document that serde must refuse or
/// widen, and the other way round).
pub fn edge_values() -> Vec<toml::Value> {
    let ints = [
        0,
        1,
        -1,
        2,
        i64::MAX,
        i64::MIN,
        i64::from(u32::MAX),
        1 << 53,
        1 << 40,
    ];
    let floats = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        1e-300,
        f64::MIN_POSITIVE / 2.0,
        1e19,
        1e30,
        -1e30,
        f64::MAX,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
    ];
    ints.into_iter()
        .map(toml::Value::Integer)
        .chain(floats.into_iter().map(toml::Value::Float))
        .collect()
}

/// `count` seeded random values: integers and floats of random sign and magnitude up to 2^62.
pub fn random_values(seed: u64, count: usize) -> Vec<toml::Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let magnitude = 2f64.powf(rng.random_range(-20.0..62.0));
            let sign = if rng.random_bool(0.25) { -1.0 } else { 1.0 };
            if rng.random_bool(0.5) {
                toml::Value::Integer((sign * magnitude.max(1.0)) as i64)
            } else {
                toml::Value::Float(sign * magnitude)
            }
        })
        .collect()
}

/// An `[algorithm]` table (rule and scheduler, with what each requires) for every rule other than
/// FedAvg under synchronous rounds, the templates' default: merged over a configuration, each
/// brings its rule's and scheduler's numeric fields into the document.
pub fn method_tables() -> Vec<String> {
    let methods = [
        ("rule = \"fedavgm\"", "sync"),
        ("rule = \"fedavg-m\", beta = 0.5, global_step = 1.0", "sync"),
        ("rule = \"scaffold\"", "sync"),
        ("rule = \"scaffold-m\", beta = 0.5, global_step = 1.0", "sync"),
        ("rule = \"scallion\", alpha = 0.5", "sync"),
        ("rule = \"scafcom\"", "sync"),
        ("rule = \"fedasync\"", "fedasync"),
        ("rule = \"fedbuff\"", "fedbuff"),
        ("rule = \"fedfix\"", "fedfix"),
        ("rule = \"fedcompass\"", "fedcompass"),
    ];
    methods
        .into_iter()
        .map(|(rule, scheduler)| {
            let needs = match scheduler {
                "sync" => "clients_per_round = 3",
                "fedbuff" => "buffer_size = 2, concurrency = 3",
                "fedasync" => "concurrency = 3",
                "fedfix" => "period_s = 10.0",
                _ => "q_min = 2, q_max = 10",
            };
            format!(
                "[algorithm]\nrule = {{ {rule} }}\nscheduler = {{ scheduler = \"{scheduler}\", {needs} }}"
            )
        })
        .collect()
}

/// A field and a value a check panicked on.
#[derive(Debug, Clone)]
pub struct Panicked {
    /// The field.
    pub field: FieldPath,
    /// The value set there.
    pub value: toml::Value,
    /// The panic's message.
    pub message: String,
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.message)
    }
}

/// What [`try_each_value`] did.
#[derive(Debug, Clone, Default)]
pub struct ConfigTally {
    /// Numeric fields of the document.
    pub fields: usize,
    /// Documents checked.
    pub cases: usize,
    /// Documents the check accepted.
    pub accepted: usize,
    /// Every panic, with its field and value.
    pub panics: Vec<Panicked>,
}

/// Sets each of `fields` of `doc` (from [`numeric_fields`]), one at a time, to each of
/// [`edge_values`] and `random_per_field` seeded [`random_values`], and runs `check` on each
/// document (`Ok(true)`: accepted, `Ok(false)` or `Err`: refused). A panic is caught and recorded
/// with its field and value; the default panic message is silenced meanwhile.
pub fn try_each_value<E>(
    doc: &toml::Value,
    fields: &[FieldPath],
    seed: u64,
    random_per_field: usize,
    mut check: impl FnMut(toml::Value) -> Result<bool, E>,
) -> ConfigTally {
    let mut tally = ConfigTally {
        fields: fields.len(),
        ..ConfigTally::default()
    };
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (i, field) in fields.iter().enumerate() {
        let values = edge_values()
            .into_iter()
            .chain(random_values(seed.wrapping_add(i as u64), random_per_field));
        for value in values {
            tally.cases += 1;
            let case = with_value(doc, field, value.clone());
            match catch_unwind(AssertUnwindSafe(|| check(case))) {
                Ok(Ok(true)) => tally.accepted += 1,
                Ok(_) => {}
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
                        .unwrap_or_else(|| "a panic without a message".into());
                    tally.panics.push(Panicked {
                        field: field.clone(),
                        value,
                        message,
                    });
                }
            }
        }
    }
    std::panic::set_hook(previous_hook);
    tally
}

/// A document to vary, and the top-level tables whose numeric fields are varied (all when empty).
#[derive(Debug, Clone)]
pub struct Variant {
    /// The document, with every default spelled out.
    pub doc: toml::Value,
    /// Top-level tables to vary.
    pub under: Vec<&'static str>,
}

/// [`try_each_value`] over each variant's chosen fields (variant `i` seeded with `seed + i`),
/// the tallies summed.
pub fn try_variants<E>(
    variants: &[Variant],
    seed: u64,
    random_per_field: usize,
    mut check: impl FnMut(toml::Value) -> Result<bool, E>,
) -> ConfigTally {
    let mut total = ConfigTally::default();
    for (i, variant) in variants.iter().enumerate() {
        let fields = fields_under(&variant.doc, &variant.under);
        let tally = try_each_value(
            &variant.doc,
            &fields,
            seed.wrapping_add(i as u64),
            random_per_field,
            &mut check,
        );
        total.fields += tally.fields;
        total.cases += tally.cases;
        total.accepted += tally.accepted;
        total.panics.extend(tally.panics);
    }
    total
}

impl ConfigTally {
    /// A failure message when something panicked, or when the check accepted fewer than a tenth
    /// of the cases (the base documents themselves would be broken); `None` when sound.
    pub fn defect(&self) -> Option<String> {
        if !self.panics.is_empty() {
            let list: Vec<String> = self.panics.iter().map(ToString::to_string).collect();
            return Some(format!(
                "{} cases panicked:\n{}",
                self.panics.len(),
                list.join("\n")
            ));
        }
        if self.fields == 0 || self.accepted * 10 < self.cases {
            return Some(format!(
                "{} of {} cases over {} fields were accepted: the base documents are refused",
                self.accepted, self.cases, self.fields
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_is_found_and_set_in_place() {
        let doc: toml::Value = toml::from_str("a = 1\n[t]\nb = 2.5\nc = [3, { d = 4 }]\ns = \"x\"")
            .unwrap_or_else(|e| panic!("{e}"));
        let fields = numeric_fields(&doc);
        let names: Vec<String> = fields.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["a", "t.b", "t.c[0]", "t.c[1].d"]);
        let changed = with_value(&doc, &fields[3], toml::Value::Float(f64::NAN));
        assert!(changed["t"]["c"][1]["d"].as_float().is_some_and(f64::is_nan));
        assert_eq!(changed["a"].as_integer(), Some(1));
    }

    #[test]
    fn a_panic_is_caught_with_its_field_and_value() {
        let doc: toml::Value = toml::from_str("a = 1\nb = 2").unwrap_or_else(|e| panic!("{e}"));
        let tally = try_each_value(&doc, &numeric_fields(&doc), 7, 3, |case| {
            let b = case["b"].as_integer().unwrap_or(1);
            assert!(b != i64::MIN, "b is i64::MIN");
            Ok::<_, ()>(b > 0)
        });
        assert_eq!(tally.fields, 2);
        assert_eq!(tally.cases, 2 * (edge_values().len() + 3));
        assert_eq!(tally.panics.len(), 1, "{:?}", tally.panics);
        assert_eq!(tally.panics[0].field.to_string(), "b");
        assert_eq!(tally.panics[0].message, "b is i64::MIN");
    }
}
