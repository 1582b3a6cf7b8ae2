//! `domauth store export` / `import`: the authorization data as one JSON document, the
//! same for every backend (SPEC §11), without queued mail.
//!
//! ```json
//! {"format": "domauth-store", "version": 1,
//!  "trees": {"hostings": [{"key": ["acme"], "value": {"name": "acme", ...}}], ...}}
//! ```
//!
//! One list per tree of the sled layout (`sled::TREES`); a key is its `\0`-separated parts,
//! a value the stored record as JSON (a string for `own_domains`, null for the
//! `account_index`). Records keep every field they have, including ones this version does
//! not know.

use crate::sled::{SledStore, TREES};
use crate::{AuthorizedAccount, AuthorizedDomain, Hosting, Mailbox, Result, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A stored key and value.
pub(crate) type RawEntry = (Vec<u8>, Vec<u8>);

pub const FORMAT: &str = "domauth-store";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dump {
    pub format: String,
    pub version: u32,
    pub trees: BTreeMap<String, Vec<DumpEntry>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DumpEntry {
    pub key: Vec<String>,
    #[serde(default)]
    pub value: serde_json::Value,
}

/// How a tree stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueKind {
    /// A JSON record.
    Json,
    /// A plain UTF-8 string (the owning hosting of an own domain).
    Text,
    /// Nothing: an index whose key says it all.
    Empty,
}

pub(crate) fn value_kind(tree: &str) -> ValueKind {
    match tree {
        "own_domains" => ValueKind::Text,
        "account_index" => ValueKind::Empty,
        _ => ValueKind::Json,
    }
}

/// The `\0`-separated parts of a stored key.
pub(crate) fn split_key(tree: &str, key: &[u8]) -> Result<Vec<String>> {
    let text = std::str::from_utf8(key)
        .map_err(|_| StoreError::Corrupt(format!("{tree}: key {key:?} is not UTF-8")))?;
    Ok(text.split('\0').map(str::to_string).collect())
}

pub(crate) fn join_key(parts: &[String]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// A stored value as dump JSON.
pub(crate) fn value_to_json(tree: &str, key: &[String], value: &[u8]) -> Result<serde_json::Value> {
    let what = || format!("{tree} {key:?}");
    Ok(match value_kind(tree) {
        ValueKind::Json => serde_json::from_slice(value)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))?,
        ValueKind::Text => serde_json::Value::String(
            String::from_utf8(value.to_vec())
                .map_err(|_| StoreError::Corrupt(format!("{}: value is not UTF-8", what())))?,
        ),
        ValueKind::Empty => serde_json::Value::Null,
    })
}

/// Dump JSON as the bytes to store, checked against the record type of the tree.
pub(crate) fn json_to_value(
    tree: &str,
    key: &[String],
    value: &serde_json::Value,
) -> Result<Vec<u8>> {
    let bad = |e: String| StoreError::Invalid(format!("dump: {tree} {key:?}: {e}"));
    match value_kind(tree) {
        ValueKind::Json => {
            let check = match tree {
                "hostings" => Hosting::deserialize(value).map(drop),
                "mailboxes" => Mailbox::deserialize(value).map(drop),
                "domains" => AuthorizedDomain::deserialize(value).map(drop),
                "accounts" => AuthorizedAccount::deserialize(value).map(drop),
                _ => Ok(()),
            };
            check.map_err(|e| bad(e.to_string()))?;
            serde_json::to_vec(value).map_err(|e| bad(e.to_string()))
        }
        ValueKind::Text => match value {
            serde_json::Value::String(s) => Ok(s.clone().into_bytes()),
            _ => Err(bad("the value must be a string".into())),
        },
        ValueKind::Empty => Ok(Vec::new()),
    }
}

impl Dump {
    /// Everything in `store`.
    pub(crate) fn of(store: &SledStore) -> Result<Dump> {
        let mut trees = BTreeMap::new();
        for name in TREES {
            let mut entries = Vec::new();
            for entry in store.tree(name)?.iter() {
                let (key, value) = entry?;
                let key = split_key(name, &key)?;
                let value = value_to_json(name, &key, &value)?;
                entries.push(DumpEntry { key, value });
            }
            trees.insert(name.to_string(), entries);
        }
        Ok(Dump {
            format: FORMAT.to_string(),
            version: VERSION,
            trees,
        })
    }

    /// Checks the header and the tree names; returns the entries as stored bytes, per
    /// tree in `TREES` order.
    pub(crate) fn raw(&self) -> Result<Vec<(&'static str, Vec<RawEntry>)>> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(StoreError::Invalid(format!(
                "dump: not a {FORMAT} version {VERSION} document (format {:?}, version {})",
                self.format, self.version
            )));
        }
        if let Some(unknown) = self.trees.keys().find(|k| !TREES.contains(&k.as_str())) {
            return Err(StoreError::Invalid(format!(
                "dump: unknown tree {unknown:?}"
            )));
        }
        let mut out = Vec::new();
        for name in TREES {
            let mut rows = Vec::new();
            for entry in self.trees.get(*name).map(Vec::as_slice).unwrap_or_default() {
                rows.push((
                    join_key(&entry.key),
                    json_to_value(name, &entry.key, &entry.value)?,
                ));
            }
            out.push((*name, rows));
        }
        Ok(out)
    }

    /// How many records (index entries not counted).
    pub fn records(&self) -> usize {
        self.trees
            .iter()
            .filter(|(name, _)| value_kind(name) != ValueKind::Empty)
            .map(|(_, entries)| entries.len())
            .sum()
    }
}

impl SledStore {
    /// Loads `dump` into this store, which must be empty. Returns the number of records.
    pub fn import(&self, dump: &Dump) -> Result<usize> {
        let raw = dump.raw()?;
        if !self.is_empty()? {
            return Err(StoreError::Conflict(
                "the target store is not empty: import only into a new store".into(),
            ));
        }
        for (name, rows) in raw {
            let tree = self.tree(name)?;
            for (key, value) in rows {
                tree.insert(key, value)?;
            }
        }
        self.flush()?;
        Ok(dump.records())
    }

    /// Everything in this store.
    pub fn export(&self) -> Result<Dump> {
        Dump::of(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled::test_util::strings;

    #[test]
    fn export_then_import_gives_the_same_data() {
        let a = SledStore::temporary().unwrap();
        a.add_hosting("acme", &strings(&["acme.example"])).unwrap();
        a.add_mailbox("joe@acme.example", "$argon2id$x").unwrap();
        a.add_domain("acme", "example.org", "tok-1").unwrap();
        a.update_domain("acme", "example.org", |d| {
            d.status = crate::DomainStatus::Verified
        })
        .unwrap();
        a.add_account("acme", "sales@example.org").unwrap();
        let dump = a.export().unwrap();
        let text = serde_json::to_string(&dump).unwrap();
        let back: Dump = serde_json::from_str(&text).unwrap();
        let b = SledStore::temporary().unwrap();
        assert_eq!(b.import(&back).unwrap(), 5);
        assert_eq!(b.export().unwrap(), dump);
        assert_eq!(
            b.hostings_with_account("sales@example.org").unwrap(),
            strings(&["acme"])
        );
        assert_eq!(
            b.hosting_of_domain("acme.example").unwrap().as_deref(),
            Some("acme")
        );
        // A second import is refused: the store is not empty.
        assert!(matches!(b.import(&back), Err(StoreError::Conflict(_))));
    }

    #[test]
    fn a_bad_dump_is_refused_with_its_reason() {
        let b = SledStore::temporary().unwrap();
        let bad: Dump = serde_json::from_str(
            r#"{"format":"domauth-store","version":1,"trees":{"hostings":[{"key":["x"],"value":{"nope":1}}]}}"#,
        )
        .unwrap();
        match b.import(&bad) {
            Err(StoreError::Invalid(m)) => assert!(m.contains("hostings"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(b.is_empty().unwrap());
    }
}
