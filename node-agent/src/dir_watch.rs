//! Watching a directory for edits: the CNI configuration directory in a cluster, the
//! sandbox's objects directory.

use std::path::Path;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, Watcher};
use tokio::sync::mpsc;

/// Whether `kind` can mean a file in the directory changed. inotify also reports a file
/// being opened (notify's `Access`); counted as a change, a watcher that reads the
/// directory on each change would wake itself with its own reads, and any other reader
/// (the container runtime, another watcher) would keep it busy. A file closed after
/// writing (`Access(Close(Write))`) is a change.
pub fn is_edit(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches `dir` (not its subdirectories), sending on `tx` after each edit; while a send
/// is pending, further edits are folded into it. An error (from the watch) is counted
/// as an edit, so that the watcher's user looks again.
pub fn edits(dir: &Path, tx: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.as_ref().map_or(true, |e| is_edit(&e.kind)) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits for what the watcher sends within `wait`.
    async fn sent(rx: &mut mpsc::Receiver<()>, wait: Duration) -> bool {
        tokio::time::timeout(wait, rx.recv()).await.is_ok()
    }

    #[tokio::test]
    async fn reading_the_directory_is_not_an_edit_and_writing_is() {
        let dir = std::env::temp_dir().join(format!("weft-dir-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a.conflist"), "{}").expect("write");
        let (tx, mut rx) = mpsc::channel(1);
        let _watcher = edits(&dir, tx).expect("watch");

        // What a reader does: list the directory, open and read each file.
        for _ in 0..3 {
            for entry in std::fs::read_dir(&dir).expect("list") {
                let path = entry.expect("entry").path();
                std::fs::read_to_string(&path).expect("read");
            }
        }
        assert!(
            !sent(&mut rx, Duration::from_millis(300)).await,
            "reading the directory's files was taken for an edit"
        );

        std::fs::write(dir.join("b.conflist"), "{}").expect("write");
        assert!(
            sent(&mut rx, Duration::from_secs(10)).await,
            "a new file was not seen"
        );
        while rx.try_recv().is_ok() {}
        std::fs::remove_file(dir.join("a.conflist")).expect("remove");
        assert!(
            sent(&mut rx, Duration::from_secs(10)).await,
            "a removed file was not seen"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
