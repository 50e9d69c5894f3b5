//! Opening a store: its tables made, its pool checked, and stores of older schemas brought
//! up to [`SCHEMA`] in the same transaction.

use redb::{ReadableTable, WriteTransaction};

use super::{
    decode, Base, Owner, Record, State, StoreError, StoreResult, Volume, BASES, CHILDREN, JOBS,
    META, META_NEXT_THIN_ID, POOL_NAME, RECLAIM, SCHEMA, SNAPSHOTS, THIN_IDS, UNSETTLED, VOLUMES,
};

/// Meta key: set once [`UNSETTLED`] indexes every record (stores made before it existed are
/// indexed at their first open).
const META_UNSETTLED_INDEXED: &str = "unsettled_indexed";
/// Meta key of schema 1: the pool's transaction id, no longer kept.
const META_POOL_TXN_V1: &str = "pool_txn";

/// Makes every table, checks the schema and the pool, and upgrades an older store.
pub(super) fn prepare(tx: &WriteTransaction, path: &str, pool: &str) -> StoreResult<()> {
    tx.open_table(SNAPSHOTS)?;
    tx.open_multimap_table(CHILDREN)?;
    tx.open_table(THIN_IDS)?;
    tx.open_table(BASES)?;
    tx.open_table(VOLUMES)?;
    tx.open_table(JOBS)?;
    tx.open_table(UNSETTLED)?;
    tx.open_table(RECLAIM)?;
    let schema = tx.open_table(META)?.get("schema")?.map(|v| v.value());
    match schema {
        None => {
            let mut meta = tx.open_table(META)?;
            meta.insert("schema", SCHEMA)?;
            meta.insert(META_NEXT_THIN_ID, 1)?;
            meta.insert(META_UNSETTLED_INDEXED, 1)?;
        }
        Some(1) => from_v1(tx)?,
        Some(SCHEMA) => {}
        Some(v) => {
            return Err(StoreError::Mismatch {
                path: path.to_string(),
                why: format!(
                    "schema version {v} is newer than this thinsnap's ({SCHEMA}): it was written by a newer thinsnap; run that version"
                ),
            })
        }
    }
    index_unsettled(tx)?;
    check_pool(tx, path, pool)
}

/// Indexes the records that are not Ready, once (stores made before the index existed).
fn index_unsettled(tx: &WriteTransaction) -> StoreResult<()> {
    let mut meta = tx.open_table(META)?;
    if meta.get(META_UNSETTLED_INDEXED)?.is_some() {
        return Ok(());
    }
    let mut unsettled = tx.open_table(UNSETTLED)?;
    let t = tx.open_table(SNAPSHOTS)?;
    for entry in t.iter()? {
        let (k, v) = entry?;
        let r: Record = decode(v.value(), || k.value().to_string())?;
        if r.device.state != State::Ready {
            unsettled.insert(k.value(), ())?;
        }
    }
    meta.insert(META_UNSETTLED_INDEXED, 1)?;
    Ok(())
}

/// Schema 1 → 2: thin-id owners were bare snapshot keys, `base:<fs>` or `volume:<name>`
/// (ambiguous: a snapshot key may look like either); each is now written as its
/// [`Owner`], told apart by the base and volume records that hold the id. The pool's
/// transaction id is no longer kept.
fn from_v1(tx: &WriteTransaction) -> StoreResult<()> {
    let mut bases = std::collections::BTreeMap::new();
    for entry in tx.open_table(BASES)?.iter()? {
        let (k, v) = entry?;
        let b: Base = decode(v.value(), || format!("base:{}", k.value()))?;
        bases.insert(b.device.thin_id.get(), b.owner());
    }
    let mut volumes = std::collections::BTreeMap::new();
    for entry in tx.open_table(VOLUMES)?.iter()? {
        let (k, v) = entry?;
        let vol: Volume = decode(v.value(), || format!("volume:{}", k.value()))?;
        volumes.insert(vol.device.thin_id.get(), vol.owner());
    }
    let mut ids = tx.open_table(THIN_IDS)?;
    let old: Vec<(u32, String)> = ids
        .iter()?
        .map(|e| e.map(|(k, v)| (k.value(), v.value().to_string())))
        .collect::<Result<_, _>>()?;
    for (id, text) in old {
        let owner = bases
            .get(&id)
            .or_else(|| volumes.get(&id))
            .cloned()
            .unwrap_or(Owner::Snapshot(text));
        ids.insert(id, owner.encode().as_str())?;
    }
    let mut meta = tx.open_table(META)?;
    meta.remove(META_POOL_TXN_V1)?;
    meta.insert("schema", SCHEMA)?;
    Ok(())
}

/// A store belongs to the pool it was made for.
fn check_pool(tx: &WriteTransaction, path: &str, pool: &str) -> StoreResult<()> {
    let mut name = tx.open_table(POOL_NAME)?;
    let recorded = name.get("name")?.map(|v| v.value().to_string());
    match recorded {
        None => {
            name.insert("name", pool)?;
            Ok(())
        }
        Some(n) if n == pool => Ok(()),
        Some(n) => Err(StoreError::Mismatch {
            path: path.to_string(),
            why: format!(
                "it records pool {n:?}, but the configuration names pool {pool:?}: fix `pool.name`, or use another `state_dir`"
            ),
        }),
    }
}
