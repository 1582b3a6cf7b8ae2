//! Panel sessions in memory, bounded. tower-sessions' `MemoryStore` never
//! forgets an expired session, and every visit to the sign-in page makes
//! one (it holds the form's CSRF token): a stream of anonymous requests
//! would grow it without end. This store sweeps expired sessions as new
//! ones arrive and, past a ceiling, drops the ones closest to expiry.

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use tokio::sync::Mutex;
use tower_sessions::{
    SessionStore,
    cookie::time::OffsetDateTime,
    session::{Id, Record},
    session_store,
};

/// Far above the sessions of any hosting provider's customers at once.
const MAX_SESSIONS: usize = 50_000;

#[derive(Clone, Debug, Default)]
pub struct BoundedMemoryStore(Arc<Mutex<HashMap<Id, Record>>>);

fn active(r: &Record, now: OffsetDateTime) -> bool {
    r.expiry_date > now
}

#[async_trait]
impl SessionStore for BoundedMemoryStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let mut map = self.0.lock().await;
        if map.len() >= MAX_SESSIONS {
            let now = OffsetDateTime::now_utc();
            map.retain(|_, r| active(r, now));
            if map.len() >= MAX_SESSIONS {
                let mut by_expiry: Vec<(OffsetDateTime, Id)> =
                    map.iter().map(|(id, r)| (r.expiry_date, *id)).collect();
                by_expiry.sort_by_key(|(expiry, _)| *expiry);
                for (_, id) in by_expiry.iter().take(map.len() / 10 + 1) {
                    map.remove(id);
                }
            }
        }
        while map.contains_key(&record.id) {
            record.id = Id::default();
        }
        map.insert(record.id, record.clone());
        Ok(())
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.0.lock().await.insert(record.id, record.clone());
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let now = OffsetDateTime::now_utc();
        let mut map = self.0.lock().await;
        match map.get(id) {
            Some(r) if active(r, now) => Ok(Some(r.clone())),
            Some(_) => {
                map.remove(id);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.0.lock().await.remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(expires_in: i64) -> Record {
        Record {
            id: Id::default(),
            data: Default::default(),
            expiry_date: OffsetDateTime::now_utc()
                + tower_sessions::cookie::time::Duration::seconds(expires_in),
        }
    }

    #[tokio::test]
    async fn expired_sessions_are_not_loaded_and_the_store_stays_bounded() {
        let store = BoundedMemoryStore::default();
        let mut old = record(-1);
        store.create(&mut old).await.unwrap();
        assert!(store.load(&old.id).await.unwrap().is_none());
        let mut live = record(600);
        store.create(&mut live).await.unwrap();
        assert!(store.load(&live.id).await.unwrap().is_some());
        for _ in 0..MAX_SESSIONS + 10 {
            store.create(&mut record(60)).await.unwrap();
        }
        assert!(store.0.lock().await.len() <= MAX_SESSIONS);
        // The longest-lived session survived the trimming.
        assert!(store.load(&live.id).await.unwrap().is_some());
    }
}
