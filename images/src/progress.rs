//! Progress reporting for long builds. A trait, so the daemon can forward phases to its
//! API while the CLI draws a spinner, and tests stay quiet.

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub trait Progress {
    /// A new phase starts; the previous one (if any) is finished.
    fn phase(&self, name: &str);
    /// The whole job finished (successfully or not).
    fn done(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _name: &str) {}
    fn done(&self) {}
}

/// A spinner on stderr that prints each finished phase with its duration, so the slow
/// step of a build is visible afterwards.
pub struct ConsoleProgress {
    bar: ProgressBar,
    current: Mutex<Option<(String, Instant)>>,
    started: Instant,
}

impl ConsoleProgress {
    pub fn new(title: &str) -> ConsoleProgress {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix}: {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_prefix(title.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        ConsoleProgress {
            bar,
            current: Mutex::new(None),
            started: Instant::now(),
        }
    }

    fn finish_current(&self) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((name, since)) = current.take() {
            let line = format!("  {name}: {:.1} s", since.elapsed().as_secs_f64());
            // A hidden bar (stderr is not a terminal: CI, logs) drops println.
            if self.bar.is_hidden() {
                eprintln!("{line}");
            } else {
                self.bar.println(line);
            }
        }
    }
}

impl Progress for ConsoleProgress {
    fn phase(&self, name: &str) {
        self.finish_current();
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((name.to_string(), Instant::now()));
        self.bar.reset_elapsed();
        self.bar.set_message(name.to_string());
    }

    fn done(&self) {
        self.finish_current();
        self.bar.finish_and_clear();
        eprintln!(
            "{}: {:.1} s",
            self.bar.prefix(),
            self.started.elapsed().as_secs_f64()
        );
    }
}
