//! The open-files limit: each connection is a descriptor, and the soft limit a shell hands out
//! (often 1,024) is far below `max_connections`, so the relay raises it towards the hard limit
//! at start, as servers usually do, and says when even that is too low.

/// Descriptors the relay needs besides its connections: listeners, journal and snapshot files,
/// the metrics exporter, the runtime's own.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The soft limit before and after [`raise_open_files`], and the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

impl OpenFiles {
    /// Whether `max_connections` connections fit under the limit now in force.
    pub fn fits(&self, max_connections: usize) -> bool {
        self.after >= max_connections as u64 + RESERVED_DESCRIPTORS
    }
}

/// Raises the soft open-files limit to what `max_connections` needs, at most the hard limit;
/// leaves it alone when it is already enough. `None` where the platform has no such limit.
#[cfg(unix)]
pub fn raise_open_files(max_connections: usize) -> std::io::Result<Option<OpenFiles>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let current = getrlimit(Resource::Nofile);
    let (Some(before), hard) = (current.current, current.maximum) else {
        return Ok(None); // unlimited
    };
    let wanted = max_connections as u64 + RESERVED_DESCRIPTORS;
    let target = hard.map_or(wanted, |hard| wanted.min(hard));
    let after = if target > before {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: hard,
            },
        )?;
        target
    } else {
        before
    };
    Ok(Some(OpenFiles {
        before,
        after,
        hard: hard.unwrap_or(u64::MAX),
    }))
}

#[cfg(not(unix))]
pub fn raise_open_files(_max_connections: usize) -> std::io::Result<Option<OpenFiles>> {
    Ok(None)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn raises_to_what_is_needed_within_the_hard_limit() {
        let Some(first) = raise_open_files(16).unwrap() else {
            return; // no limit to raise
        };
        // A small need never lowers the limit.
        assert!(first.after >= first.before);
        let wanted = 100_000;
        let raised = raise_open_files(wanted).unwrap().unwrap();
        assert_eq!(raised.before, first.after);
        assert_eq!(
            raised.after,
            (wanted as u64 + RESERVED_DESCRIPTORS)
                .min(raised.hard)
                .max(raised.before)
        );
        assert_eq!(raised.fits(wanted), raised.after >= wanted as u64 + 64);
    }
}
