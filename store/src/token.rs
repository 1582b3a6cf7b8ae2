//! API tokens of a hosting (SPEC §8): the HTTP API's bearer tokens, stored only as a hash.
//! The token itself is `<id>.<secret>`; the id finds the record, the secret's hash is
//! compared by the caller (in constant time). Hashing is the caller's job: this crate
//! only keeps what it is given.

use crate::hosting::{hosting_key, no_hosting};
use crate::{Result, Store, StoreError, abort, decode, encode, tx_result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sled::Transactional;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiToken {
    pub hosting: String,
    /// Hex SHA-256 of the token's secret part.
    pub secret_hash: String,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Keeps a new token of an existing hosting under `id` (random, unique).
    pub fn add_api_token(&self, id: &str, hosting: &str, secret_hash: &str) -> Result<ApiToken> {
        let hosting = hosting_key(hosting);
        let token = ApiToken {
            hosting: hosting.clone(),
            secret_hash: secret_hash.to_string(),
            created_at: Utc::now(),
        };
        let value = encode(&token);
        tx_result(
            (&self.hostings, &self.api_tokens).transaction(|(hostings, tokens)| {
                if hostings.get(&hosting)?.is_none() {
                    return abort(no_hosting(&hosting));
                }
                if tokens.get(id)?.is_some() {
                    return abort(StoreError::Conflict("token id already in use".into()));
                }
                tokens.insert(id.as_bytes(), value.as_slice())?;
                Ok(())
            }),
        )?;
        Ok(token)
    }

    /// The token stored under `id`, if any.
    pub fn api_token(&self, id: &str) -> Result<Option<ApiToken>> {
        self.api_tokens
            .get(id)?
            .map(|v| decode(format_args!("api token {id:?}"), &v))
            .transpose()
    }

    /// Removes every token of the hosting; returns how many there were.
    pub fn revoke_api_tokens(&self, hosting: &str) -> Result<usize> {
        let hosting = self.require_hosting(hosting)?;
        let mut removed = 0;
        for entry in self.api_tokens.iter() {
            let (key, value) = entry?;
            let token: ApiToken = decode("api token", &value)?;
            if token.hosting == hosting && self.api_tokens.remove(&key)?.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::{store, strings};

    #[test]
    fn add_find_revoke() {
        let (_dir, store) = store();
        store
            .add_hosting("acme", &strings(&["acme.example"]))
            .unwrap();
        store
            .add_hosting("beta", &strings(&["beta.example"]))
            .unwrap();
        assert!(store.add_api_token("x", "nobody", "h").is_err());
        store.add_api_token("a1", "acme", "h1").unwrap();
        store.add_api_token("a2", "ACME", "h2").unwrap();
        store.add_api_token("b1", "beta", "h3").unwrap();
        assert!(store.add_api_token("a1", "acme", "h").is_err());
        assert_eq!(store.api_token("a2").unwrap().unwrap().hosting, "acme");
        assert_eq!(store.revoke_api_tokens("acme").unwrap(), 2);
        assert_eq!(store.api_token("a1").unwrap(), None);
        assert!(store.api_token("b1").unwrap().is_some());
    }
}
