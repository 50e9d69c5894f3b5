//! Stat, Update, Usage, Walk and Mounts.

use std::collections::BTreeMap;

use tracing::instrument;

use super::{
    filter::{Adaptor, Filter},
    validate_key, validate_labels, Error, Mount, Result, Snapshotter,
};
use crate::store::{record::now_ns, Kind, Record, State, Usage};

impl Adaptor for Record {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("name") if path.len() == 1 => Some(self.key.clone()),
            Some("parent") if path.len() == 1 => self.parent.clone(),
            Some("kind") if path.len() == 1 => Some(self.kind.as_str().to_string()),
            Some("labels") if path.len() > 1 => self.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

impl Snapshotter {
    fn ready(&self, key: &str) -> Result<Record> {
        validate_key("snapshot key", key)?;
        match self.store.read()?.get(key)? {
            Some(r) if r.state == State::Ready => Ok(r),
            _ => Err(Error::NotFound(format!("snapshot {key:?} does not exist"))),
        }
    }

    /// containerd's Stat.
    ///
    /// # Errors
    /// NotFound if `key` does not exist.
    pub fn stat(&self, key: &str) -> Result<Record> {
        self.ready(key)
    }

    /// containerd's Update: only labels can change. `paths` empty or `labels` replaces all
    /// labels; `labels.KEY` sets (or, when absent from `labels`, deletes) one label.
    ///
    /// # Errors
    /// NotFound if `key` does not exist; InvalidArgument for any other field path.
    #[instrument(level = "info", skip(self, labels), fields(key))]
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record> {
        validate_key("snapshot key", key)?;
        validate_labels(&labels)?;
        let mut tx = self.store.write()?;
        let mut record = match tx.get(key)? {
            Some(r) if r.state == State::Ready => r,
            _ => return Err(Error::NotFound(format!("snapshot {key:?} does not exist"))),
        };
        if paths.is_empty() {
            record.labels = labels;
        } else {
            let mut updated = record.labels.clone();
            for p in paths {
                if p == "labels" {
                    updated = labels.clone();
                } else if let Some(label) = p.strip_prefix("labels.") {
                    match labels.get(label) {
                        Some(v) => {
                            updated.insert(label.to_string(), v.clone());
                        }
                        None => {
                            updated.remove(label);
                        }
                    }
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {p:?} field on snapshot {key:?}: only labels can be updated"
                    )));
                }
            }
            validate_labels(&updated)?;
            record.labels = updated;
        }
        record.updated_ns = now_ns();
        tx.put(&record)?;
        tx.commit()?;
        Ok(record)
    }

    /// containerd's Usage: recorded at commit for committed snapshots, measured now for
    /// active ones and views.
    ///
    /// # Errors
    /// NotFound if `key` does not exist.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let r = self.ready(key)?;
        match (r.kind, r.usage) {
            (Kind::Committed, Some(u)) => Ok(u),
            (Kind::Committed, None) => Ok(Usage::default()),
            _ => self.measure(&r),
        }
    }

    /// containerd's Walk (List): every snapshot matching any of `filters` (containerd's
    /// filter syntax; empty matches all).
    ///
    /// # Errors
    /// InvalidArgument for a malformed filter.
    pub fn walk(&self, filters: &[String]) -> Result<Vec<Record>> {
        let filter =
            Filter::parse_all(filters).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(self
            .store
            .read()?
            .all()?
            .into_iter()
            .filter(|r| r.state == State::Ready && filter.matches(r))
            .collect())
    }

    /// containerd's Mounts: the mounts of an active snapshot or view, activating its device
    /// if needed (e.g. after a reboot).
    ///
    /// # Errors
    /// NotFound if `key` does not exist; FailedPrecondition for committed snapshots.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = self.ready(key)?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: only active snapshots and views have mounts"
            )));
        }
        let dev = self.activate(&r)?;
        Ok(self.mounts_for(&r, &dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_adapt_to_filters() {
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/gc.root".to_string(), "x".to_string());
        let mut r = Record::new(
            "k1",
            Kind::Committed,
            Some("p".into()),
            labels,
            1,
            1,
            "ext4",
            0,
        );
        r.state = State::Ready;
        let f = |s: &str| Filter::parse_all(&[s.to_string()]).unwrap().matches(&r);
        assert!(f("name==k1"));
        assert!(f("parent==p"));
        assert!(f("kind==committed"));
        assert!(f(r#"labels."containerd.io/gc.root"==x"#));
        assert!(f(r#"labels."containerd.io/gc.root""#));
        assert!(!f("kind==active"));
        assert!(!f("labels.missing"));
    }
}
