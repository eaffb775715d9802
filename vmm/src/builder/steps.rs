//! Where a build's time went: each step's wall time, logged when the VM starts, so that an
//! operator (and tools/launchbench.sh) sees what the launch path spends.

use std::fmt;
use std::time::{Duration, Instant};

/// The steps of one build, in order.
#[derive(Debug, Clone)]
pub struct BuildSteps {
    begun: Instant,
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Default for BuildSteps {
    fn default() -> Self {
        let now = Instant::now();
        BuildSteps {
            begun: now,
            last: now,
            steps: Vec::new(),
        }
    }
}

impl BuildSteps {
    /// Ends step `name`: the time since the previous step ended (or the build began).
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }

    /// Time since the build began.
    pub fn total(&self) -> Duration {
        self.last - self.begun
    }
}

impl BuildSteps {
    fn write(
        &self,
        f: &mut fmt::Formatter<'_>,
        unit: &str,
        scale: f64,
        decimals: usize,
    ) -> fmt::Result {
        let v = |d: Duration| d.as_secs_f64() * scale;
        write!(f, "{:.*} {unit} (", decimals, v(self.total()))?;
        for (i, (name, d)) in self.steps.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{name} {:.*}", decimals, v(*d))?;
        }
        write!(f, ")")
    }

    /// `1548 us (legacy devices 20, ...)`: in microseconds.
    pub fn micros(&self) -> impl fmt::Display + '_ {
        Micros(self)
    }
}

struct Micros<'a>(&'a BuildSteps);

impl fmt::Display for Micros<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.write(f, "us", 1e6, 0)
    }
}

impl fmt::Display for BuildSteps {
    /// `12.3 ms (device processes 0.4, guest RAM 0.1, ...)`: in milliseconds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, "ms", 1e3, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_add_up_to_the_total_and_print_in_order() {
        let mut s = BuildSteps::default();
        std::thread::sleep(Duration::from_millis(2));
        s.mark("first");
        s.mark("second");
        let sum: Duration = s.steps.iter().map(|(_, d)| *d).sum();
        assert_eq!(sum, s.total());
        assert!(s.steps[0].1 >= Duration::from_millis(2));
        let text = s.to_string();
        assert!(text.contains("(first "), "{text}");
        assert!(
            text.find("first").unwrap() < text.find("second").unwrap(),
            "{text}"
        );
        assert!(
            s.micros().to_string().contains(" us (first "),
            "{}",
            s.micros()
        );
    }
}
