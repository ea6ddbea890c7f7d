//! CPU time and resident memory of a process, from `/proc/PID/stat` and `/proc/PID/status`
//! (Linux). The load generator reads them for the server under test and for itself.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// CPU time a process has used so far (all its threads, user + system).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

/// Clock ticks per second of the `utime` / `stime` fields.
fn ticks_per_second() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            return ticks as u64;
        }
    }
    100
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/PID/stat` line, in ticks. The command
/// name (field 2) is in parentheses and may contain spaces, so fields are counted after the
/// last `)`.
pub fn parse_stat(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')' come field 3 (state) onwards: utime is the 12th of them, stime the 13th.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// A `kB` line such as `VmRSS:   12345 kB` of `/proc/PID/status`, in bytes.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// CPU time of `pid` (`None`: this process).
pub fn cpu_time(pid: Option<u32>) -> Result<CpuTime, String> {
    let path = proc_path(pid, "stat");
    let line = std::fs::read_to_string(&path).map_err(|err| format!("{path}: {err}"))?;
    let (utime, stime) = parse_stat(&line).ok_or_else(|| format!("{path}: unexpected format"))?;
    let ticks = ticks_per_second();
    let time = |t: u64| Duration::from_nanos(t.saturating_mul(1_000_000_000) / ticks);
    Ok(CpuTime {
        user: time(utime),
        system: time(stime),
    })
}

/// Resident set size of `pid` in bytes (`None`: this process).
pub fn rss_bytes(pid: Option<u32>) -> Result<u64, String> {
    let path = proc_path(pid, "status");
    let status = std::fs::read_to_string(&path).map_err(|err| format!("{path}: {err}"))?;
    parse_status_kib(&status, "VmRSS").ok_or_else(|| format!("{path}: no VmRSS line"))
}

/// What the server (or the generator) used over the measured interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU seconds per wall second over the interval (1.0 = one core busy).
    pub cpu_cores: f64,
    /// CPU microseconds per unit of work (message, handshake, …); 0 without work.
    pub cpu_us_per_op: f64,
    pub rss_start_bytes: u64,
    pub rss_end_bytes: u64,
}

/// A CPU and memory reading of one process at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    cpu: CpuTime,
    rss: u64,
    at: std::time::Instant,
}

impl Sample {
    pub fn take(pid: Option<u32>) -> Result<Sample, String> {
        Ok(Sample {
            cpu: cpu_time(pid)?,
            rss: rss_bytes(pid)?,
            at: std::time::Instant::now(),
        })
    }

    /// Usage between `self` (start) and `end`, for `ops` units of work.
    pub fn usage_until(&self, end: &Sample, ops: u64) -> Usage {
        let wall = end.at.saturating_duration_since(self.at).as_secs_f64();
        let cpu = end
            .cpu
            .total()
            .saturating_sub(self.cpu.total())
            .as_secs_f64();
        Usage {
            cpu_cores: if wall > 0.0 { cpu / wall } else { 0.0 },
            cpu_us_per_op: if ops > 0 { cpu * 1e6 / ops as f64 } else { 0.0 },
            rss_start_bytes: self.rss,
            rss_end_bytes: end.rss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_command_with_spaces_and_parens() {
        let line = "4242 (botd (relay) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 1000000 2500 18446744073709551615";
        assert_eq!(parse_stat(line), Some((250, 75)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_kib_lines() {
        let status = "Name:\tbotd-relay\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(10240 * 1024));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(20480 * 1024));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let start = Sample::take(None).unwrap();
        let end = Sample::take(None).unwrap();
        let usage = start.usage_until(&end, 10);
        assert!(usage.rss_end_bytes > 0);
        assert!(usage.cpu_cores >= 0.0);
    }
}
