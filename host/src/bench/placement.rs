//! Which CPU the measuring client runs on and which the process under test (the agent
//! or a floor peer) runs on.
//!
//! Left to the scheduler, two processes that ping-pong are sometimes put on one CPU
//! (a round trip of ~10 µs here) and sometimes on two (~50 µs), run to run; a ratio
//! between two such numbers measures the scheduler, not hearth. So every figure is taken
//! with both sides pinned, the same way for the agent and for its floor.

use anyhow::Context;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub client: usize,
    pub server: usize,
}

impl Placement {
    /// Client and server on two different CPUs, when this process may use two.
    pub fn cross_core() -> anyhow::Result<Option<Placement>> {
        let cpus = allowed_cpus()?;
        Ok(match cpus[..] {
            [a, b, ..] => Some(Placement {
                client: a,
                server: b,
            }),
            _ => None,
        })
    }

    /// Both on the first CPU this process may use.
    pub fn same_core() -> anyhow::Result<Placement> {
        let cpus = allowed_cpus()?;
        let cpu = *cpus.first().context("no CPU is allowed")?;
        Ok(Placement {
            client: cpu,
            server: cpu,
        })
    }

    pub fn name(&self) -> &'static str {
        if self.client == self.server {
            "same-core"
        } else {
            "cross-core"
        }
    }

    /// Pins the calling thread (the one that will measure).
    pub fn pin_client(&self) -> anyhow::Result<()> {
        pin(Pid::from_raw(0), self.client)
    }

    /// Pins every thread of process `pid` (threads it creates later inherit this).
    pub fn pin_server(&self, pid: u32) -> anyhow::Result<()> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("list the threads of {pid}"))?;
        for task in tasks {
            let tid: i32 = task?
                .file_name()
                .to_string_lossy()
                .parse()
                .context("a thread id under /proc")?;
            pin(Pid::from_raw(tid), self.server)?;
        }
        Ok(())
    }
}

fn pin(tid: Pid, cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    sched_setaffinity(tid, &set).with_context(|| format!("pin thread {tid} to CPU {cpu}"))
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("read this process's CPU set")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_this_thread_and_reads_it_back() {
        let p = Placement::same_core().unwrap();
        let before = sched_getaffinity(Pid::from_raw(0)).unwrap();
        p.pin_client().unwrap();
        assert_eq!(allowed_cpus().unwrap(), vec![p.client]);
        sched_setaffinity(Pid::from_raw(0), &before).unwrap();
        assert_eq!(p.name(), "same-core");
    }
}
