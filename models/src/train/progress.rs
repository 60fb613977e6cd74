//! The console side of a run: an indicatif progress bar (step, loss, learning rate, tokens/s,
//! ETA) on a terminal, plain log lines otherwise (indicatif hides bars when stderr is not a
//! terminal, so logs and CI output stay readable).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::metrics::StepLog;

/// stderr, or nowhere when `enabled` is false.
fn draw_target(enabled: bool) -> ProgressDrawTarget {
    if enabled {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A bar over `total` items called `unit` (e.g. "tensors") on stderr, for work other than
/// training steps; set its message to the current item's name.
pub fn count_bar(total: usize, unit: &str, enabled: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total as u64), draw_target(enabled));
    let template =
        format!("{{bar:30.cyan/blue}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}] {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Progress of a run on stderr.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total` steps starting at `done`; `enabled = false` prints nothing at all.
    pub fn new(total: usize, done: usize, enabled: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total as u64), draw_target(enabled));
        let style = ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_position(done as u64);
        bar.reset_eta();
        Self { bar }
    }

    /// Advances to `log.step` and shows its numbers.
    pub fn update(&self, log: &StepLog) {
        self.bar.set_position(log.step as u64);
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            log.loss, log.lr, log.tokens_per_s
        ));
    }

    /// Prints a line above the bar, or on stderr when the bar is hidden (quiet runs print
    /// nothing only when the bar was disabled on purpose).
    pub fn println(&self, line: &str, quiet: bool) {
        if !self.bar.is_hidden() {
            self.bar.println(line);
        } else if !quiet {
            eprintln!("{line}");
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
