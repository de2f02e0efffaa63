//! The checks behind each kind of profile value, as serde `deserialize_with`
//! functions, and [`EnvValue`], which reads an `SSHSHIM_*` variable as the
//! type its key asks for.
//!
//! A check runs inside the visitor, so the TOML deserializer pins its error
//! to the value (or the list item) at fault; the loader turns that span into
//! a line. Messages continue "key 'K' ...": "must be ..." or ": detail".

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserializer;
use serde::de::{self, IntoDeserializer, SeqAccess, Visitor};

use crate::config::spec::{Destination, ForwardSpec, Kind};
use crate::paths::expand_tilde;

/// A value as it came, before it is checked against what its key wants.
#[derive(Debug)]
enum Val {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A list (its items do not matter where a scalar was wanted).
    List,
    /// Any other type, by name.
    Other(&'static str),
}

impl Val {
    /// How the value reads in an error message.
    fn found(&self) -> String {
        match self {
            Val::Str(s) => format!("'{s}'"),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => f.to_string(),
            Val::Bool(b) => b.to_string(),
            Val::List => "a list".into(),
            Val::Other(t) => format!("a {t}"),
        }
    }
}

/// Which `deserialize_*` to call: the TOML deserializer ignores the hint
/// (it knows its types), [`EnvValue`] parses its text as hinted.
#[derive(Clone, Copy)]
enum Hint {
    /// A string.
    Str,
    /// An integer.
    Int,
    /// A number, integer or not.
    Float,
    /// A boolean.
    Bool,
}

/// A visitor that turns whatever it is given into a [`Val`] and checks it.
struct Check<F>(F);

impl<'de, T, F: FnOnce(Val) -> Result<T, String>> Visitor<'de> for Check<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a profile value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(Val::Str(v.to_owned())).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.0)(Val::Int(v)).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        // Out of i64 range: no key accepts it anyway.
        let v = i64::try_from(v).map_or(Val::Other("huge integer"), Val::Int);
        (self.0)(v).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.0)(Val::Float(v)).map_err(E::custom)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<T, E> {
        (self.0)(Val::Other("huge integer")).map_err(E::custom)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<T, E> {
        (self.0)(Val::Other("huge integer")).map_err(E::custom)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        (self.0)(Val::Bool(v)).map_err(E::custom)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        (self.0)(Val::List).map_err(de::Error::custom)
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        (self.0)(Val::Other("table")).map_err(de::Error::custom)
    }
}

/// Reads one value with `hint` and checks it with `f`.
fn checked<'de, D: Deserializer<'de>, T>(
    d: D,
    hint: Hint,
    f: impl FnOnce(Val) -> Result<T, String>,
) -> Result<T, D::Error> {
    match hint {
        Hint::Str => d.deserialize_str(Check(f)),
        Hint::Int => d.deserialize_i64(Check(f)),
        Hint::Float => d.deserialize_f64(Check(f)),
        Hint::Bool => d.deserialize_bool(Check(f)),
    }
}

/// "must be WHAT, not FOUND".
fn must(what: &str, v: &Val) -> String {
    format!("must be {what}, not {}", v.found())
}

/// A non-empty string.
fn string(v: Val, what: &str) -> Result<String, String> {
    match v {
        Val::Str(s) if !s.is_empty() => Ok(s),
        other => Err(must(what, &other)),
    }
}

/// An integer in `min..=max`.
fn int(v: Val, min: i64, max: i64, what: &str) -> Result<i64, String> {
    match v {
        Val::Int(i) if (min..=max).contains(&i) => Ok(i),
        other => Err(must(what, &other)),
    }
}

/// `[user@]host[:port]`.
pub fn destination<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, Hint::Str, |v| {
        let s = string(v, "a string [user@]host[:port]")?;
        s.parse::<Destination>().map_err(|e| format!(": {e}"))?;
        Ok(Some(s))
    })
}

/// Jump hosts, `[user@]host[:port]` comma-separated, or `none`.
pub fn jumps<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, Hint::Str, |v| {
        let s = string(v, "a string of [user@]host[:port], comma-separated")?;
        for hop in s.split(',').filter(|h| *h != "none") {
            hop.parse::<Destination>()
                .map_err(|e| format!(": jump host '{hop}': {e}"))?;
        }
        Ok(Some(s))
    })
}

/// A TCP port.
pub fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    checked(d, Hint::Int, |v| {
        Ok(Some(int(v, 1, 65535, "an integer 1-65535")? as u16))
    })
}

/// A non-empty name.
pub fn name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, Hint::Str, |v| string(v, "a non-empty string").map(Some))
}

/// A command line, run by the shell.
pub fn command<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, Hint::Str, |v| string(v, "a command (string)").map(Some))
}

/// A path on the server (not expanded here: `~` means the remote home).
pub fn remote_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    checked(d, Hint::Str, |v| {
        string(v, "a path on the server (string)").map(Some)
    })
}

/// A file path, `~` expanded.
pub fn path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    checked(d, Hint::Str, |v| {
        Ok(Some(expand_tilde(Path::new(&string(v, "a file path")?))))
    })
}

/// true or false.
pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    checked(d, Hint::Bool, |v| match v {
        Val::Bool(b) => Ok(Some(b)),
        other => Err(must("true or false", &other)),
    })
}

/// `ADDR:PORT`.
pub fn addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    checked(d, Hint::Str, |v| {
        let s = string(v, "a string ADDR:PORT")?;
        s.parse().map(Some).map_err(|_| {
            format!("must be ADDR:PORT such as 127.0.0.1:2222 or [::1]:2222, not '{s}'")
        })
    })
}

/// A whole number of seconds, at least 1.
pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let what = "an integer number of seconds >= 1";
    checked(d, Hint::Int, |v| {
        Ok(Some(int(v, 1, i64::MAX, what)? as u64))
    })
}

/// A count, at least 1.
pub fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    checked(d, Hint::Int, |v| {
        Ok(Some(int(v, 1, i64::MAX, "an integer >= 1")? as u64))
    })
}

/// A count of upstream connections, 1 to [`super::MAX_UPSTREAMS_CAP`].
pub fn upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let cap = super::MAX_UPSTREAMS_CAP;
    checked(d, Hint::Int, |v| {
        Ok(Some(
            int(v, 1, cap as i64, &format!("an integer 1-{cap}"))? as u64
        ))
    })
}

/// A positive number of seconds, fractions allowed.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    checked(d, Hint::Float, |v| {
        let f = match v {
            Val::Int(i) => i as f64,
            Val::Float(f) => f,
            other => return Err(must("a number of seconds > 0", &other)),
        };
        // try_from_secs_f64 also rejects NaN, infinity and overflow.
        match Duration::try_from_secs_f64(f) {
            Ok(d) if !d.is_zero() => Ok(Some(d)),
            _ => Err(format!("must be a number of seconds > 0, not {f}")),
        }
    })
}

/// A list of file paths, `~` expanded.
pub fn paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    list(d, |s| Ok(expand_tilde(Path::new(&s))))
}

/// A list of `-L` specs.
pub fn local_forwards<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ForwardSpec>, D::Error> {
    list(d, |s| {
        ForwardSpec::parse(Kind::Local, &s).map_err(|e| format!(": {e}"))
    })
}

/// A list of `-R` specs.
pub fn remote_forwards<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ForwardSpec>, D::Error> {
    list(d, |s| {
        ForwardSpec::parse(Kind::Remote, &s).map_err(|e| format!(": {e}"))
    })
}

/// A list of strings, each checked by `item`. A lone string is a list of
/// one: `identity = "~/k"` is what people write for one file.
fn list<'de, D: Deserializer<'de>, T>(
    d: D,
    item: impl Fn(String) -> Result<T, String>,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(List(item))
}

/// The visitor of [`list`].
struct List<F>(F);

impl<'de, T, F: Fn(String) -> Result<T, String>> Visitor<'de> for List<F> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of strings")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
        (self.0)(v.to_owned()).map(|t| vec![t]).map_err(E::custom)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(t) = seq.next_element_seed(Item {
            n: out.len() + 1,
            check: &self.0,
        })? {
            out.push(t);
        }
        Ok(out)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<T>, E> {
        Err(E::custom(must("a list of strings", &Val::Int(v))))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Vec<T>, E> {
        Err(E::custom(must(
            "a list of strings",
            &Val::Other("huge integer"),
        )))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Vec<T>, E> {
        Err(E::custom(must("a list of strings", &Val::Float(v))))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Vec<T>, E> {
        Err(E::custom(must("a list of strings", &Val::Bool(v))))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Vec<T>, A::Error> {
        Err(de::Error::custom(must(
            "a list of strings",
            &Val::Other("table"),
        )))
    }
}

/// Item `n` (1-based) of a list, checked inside its own visitor so that an
/// error points at the item's line.
struct Item<'a, F> {
    /// Its place in the list, for the message.
    n: usize,
    /// The check of [`List`].
    check: &'a F,
}

impl<'de, T, F: Fn(String) -> Result<T, String>> de::DeserializeSeed<'de> for Item<'_, F> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, T, F: Fn(String) -> Result<T, String>> Visitor<'de> for Item<'_, F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.check)(v.to_owned()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Err(self.not_a_string("integer"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Err(self.not_a_string("integer"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Err(self.not_a_string("float"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Err(self.not_a_string("boolean"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(self.not_a_string("array"))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(self.not_a_string("table"))
    }
}

impl<F> Item<'_, F> {
    /// The error for an item of type `t`.
    fn not_a_string<E: de::Error>(&self, t: &str) -> E {
        E::custom(format!(
            "must be a list of strings, but item {} is a {t}",
            self.n
        ))
    }
}

/// The text of an `SSHSHIM_*` variable, read as the type asked for:
/// integers and numbers parsed, booleans as 1/0, true/false, yes/no, on/off,
/// lists comma-separated. Text that does not fit stays a string, so the
/// check reports the type it wanted.
pub struct EnvValue<'a>(pub &'a str);

impl<'de> IntoDeserializer<'de, de::value::Error> for EnvValue<'_> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> Deserializer<'de> for EnvValue<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        v.visit_str(self.0)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        match self.0.parse() {
            Ok(i) => v.visit_i64(i),
            Err(_) => v.visit_str(self.0),
        }
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        match (self.0.parse::<i64>(), self.0.parse::<f64>()) {
            (Ok(i), _) => v.visit_i64(i),
            (_, Ok(f)) => v.visit_f64(f),
            _ => v.visit_str(self.0),
        }
    }
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        match self.0.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => v.visit_bool(true),
            "0" | "false" | "no" | "off" => v.visit_bool(false),
            _ => v.visit_str(self.0),
        }
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        let items = self.0.split(',').map(str::trim).filter(|i| !i.is_empty());
        v.visit_seq(de::value::SeqDeserializer::new(items))
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        v.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u8 u16 u32 u64 u128 f32 char str string bytes byte_buf unit
        unit_struct newtype_struct tuple tuple_struct map struct enum identifier ignored_any
    }
}
