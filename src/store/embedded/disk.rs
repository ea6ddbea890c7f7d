//! Disk gauges of the embedded store: bytes its journal and snapshots take, and bytes still
//! free on their file system, so an operator is warned before a full disk stops the journal.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{JOURNAL_DIR, SNAPSHOT_DIR};
use crate::metrics as m;

/// How often the disk gauges are refreshed.
pub const DISK_GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// What the store's files take and what their file system has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes of journal segments and snapshots.
    pub store_bytes: u64,
    /// Bytes an unprivileged writer may still use on the data directory's file system (`None`
    /// where the platform cannot say).
    pub available_bytes: Option<u64>,
}

/// Reads the usage of the store under `data_dir` (a few syscalls per file: call it off the
/// runtime's workers).
pub fn usage(data_dir: &Path) -> io::Result<DiskUsage> {
    let mut store_bytes = 0;
    for sub in [JOURNAL_DIR, SNAPSHOT_DIR] {
        let dir = match std::fs::read_dir(data_dir.join(sub)) {
            Ok(dir) => dir,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for entry in dir {
            let meta = entry?.metadata()?;
            if meta.is_file() {
                store_bytes += meta.len();
            }
        }
    }
    Ok(DiskUsage {
        store_bytes,
        available_bytes: available_bytes(data_dir)?,
    })
}

#[cfg(unix)]
fn available_bytes(dir: &Path) -> io::Result<Option<u64>> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(Some(stat.f_bavail.saturating_mul(stat.f_frsize)))
}

#[cfg(not(unix))]
fn available_bytes(_dir: &Path) -> io::Result<Option<u64>> {
    Ok(None)
}

/// Sets `botd_store_disk_bytes` and `botd_store_disk_available_bytes` every
/// [`DISK_GAUGE_INTERVAL`] until `shutdown`; a failed reading is logged and tried again.
pub async fn run_disk_gauges(data_dir: PathBuf, shutdown: CancellationToken) {
    let store = metrics::gauge!(m::STORE_DISK_BYTES);
    let available = metrics::gauge!(m::STORE_DISK_AVAILABLE_BYTES);
    let mut tick = tokio::time::interval(DISK_GAUGE_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dir = data_dir.clone();
        match tokio::task::spawn_blocking(move || usage(&dir)).await {
            Ok(Ok(reading)) => {
                store.set(reading.store_bytes as f64);
                if let Some(bytes) = reading.available_bytes {
                    available.set(bytes as f64);
                }
            }
            Ok(Err(err)) => {
                tracing::warn!(dir = %data_dir.display(), %err, "cannot read disk usage")
            }
            Err(err) => tracing::warn!(%err, "disk usage task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_journal_and_snapshot_files_only() {
        let dir = std::env::temp_dir().join(format!("botd-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(JOURNAL_DIR)).unwrap();
        std::fs::create_dir_all(dir.join(SNAPSHOT_DIR)).unwrap();
        std::fs::write(dir.join(JOURNAL_DIR).join("journal-1.log"), [0u8; 1000]).unwrap();
        std::fs::write(dir.join(SNAPSHOT_DIR).join("snapshot-1.snap"), [0u8; 24]).unwrap();
        std::fs::write(dir.join("identity.key"), [0u8; 500]).unwrap();
        let reading = usage(&dir).unwrap();
        assert_eq!(reading.store_bytes, 1024);
        #[cfg(unix)]
        assert!(reading.available_bytes.unwrap() > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_not_yet_created_takes_nothing() {
        let dir = std::env::temp_dir().join(format!("botd-disk-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(usage(&dir).unwrap().store_bytes, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
