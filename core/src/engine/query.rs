//! Stat, Update, Usage, Walk and Mounts.

use std::collections::BTreeMap;

use tracing::instrument;

use super::{
    filter::{Adaptor, Filter},
    Engine, Mount,
};
use crate::{
    error::{Error, Result},
    labels::{validate_key, validate_labels},
    store::{Kind, Record, State},
    time::now_ns,
};

impl Adaptor for Record {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("name") if path.len() == 1 => Some(self.key.clone()),
            // containerd's adaptor: a snapshot without a parent has parent "" (its pull
            // looks for a layer already there with `parent==""`).
            Some("parent") if path.len() == 1 => Some(self.parent.clone().unwrap_or_default()),
            Some("kind") if path.len() == 1 => Some(self.kind.as_str().to_string()),
            Some("labels") if path.len() > 1 => self.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

impl Engine {
    pub(super) fn ready(&self, key: &str) -> Result<Record> {
        validate_key("snapshot key", key)?;
        match self.store.read()?.get(key)? {
            Some(r) if r.device.state == State::Ready => Ok(r),
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
            Some(r) if r.device.state == State::Ready => r,
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
            .filter(|r| r.device.state == State::Ready && filter.matches(r))
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
            crate::store::Device::creating(
                thinpool::ThinId::new(1).unwrap(),
                1,
                thinpool::FsType::Ext4,
            ),
        );
        r.device.state = State::Ready;
        let f = |s: &str| Filter::parse_all(&[s.to_string()]).unwrap().matches(&r);
        assert!(f("name==k1"));
        assert!(f("parent==p"));
        assert!(f("kind==committed"));
        assert!(f(r#"labels."containerd.io/gc.root"==x"#));
        assert!(f(r#"labels."containerd.io/gc.root""#));
        assert!(!f("kind==active"));
        assert!(!f("labels.missing"));
        r.parent = None;
        let f = |s: &str| Filter::parse_all(&[s.to_string()]).unwrap().matches(&r);
        assert!(f(r#"parent=="""#), "as containerd's own adaptor");
        assert!(!f("parent==p"));
    }
}
