//! The loss curve as a small hand-written SVG: training loss as a line, evaluation loss as
//! dots, step on x, loss on y, with tick labels. No plotting crate.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 405.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

/// "Nice" tick values covering `lo..=hi` (steps of 1, 2 or 5 times a power of ten).
fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / want.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= want as f64)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// A tick label without trailing noise.
fn label(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// An SVG document plotting `train` (step, loss) as a line and `eval` as dots, titled `title`.
pub fn loss_curve_svg(title: &str, train: &[(usize, f64)], eval: &[(usize, f64)]) -> String {
    let finite = |p: &&(usize, f64)| p.1.is_finite();
    let all: Vec<&(usize, f64)> = train.iter().chain(eval).filter(finite).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    if all.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text>"#,
            W / 2.0,
            H / 2.0
        );
        s.push_str("</svg>\n");
        return s;
    }
    let x_min = all.iter().map(|p| p.0).min().unwrap_or(0) as f64;
    let x_max = (all.iter().map(|p| p.0).max().unwrap_or(1) as f64).max(x_min + 1.0);
    let y_lo = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_hi = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((y_hi - y_lo) * 0.05).max(1e-3);
    let (y_min, y_max) = ((y_lo - pad).max(0.0).min(y_lo), y_hi + pad);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let px = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * pw;
    let py = |y: f64| TOP + (1.0 - (y - y_min) / (y_max - y_min)) * ph;
    // Grid and ticks.
    for t in ticks(y_min, y_max, 6) {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            label(t)
        );
    }
    for t in ticks(x_min, x_max, 8) {
        let x = px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            label(t)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#,
        LEFT + pw / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">loss</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    // Training loss.
    let points: Vec<String> = train
        .iter()
        .filter(finite)
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x as f64), py(y)))
        .collect();
    if !points.is_empty() {
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.8" points="{}"/>"##,
            points.join(" ")
        );
    }
    for &(x, y) in eval.iter().filter(finite) {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#d62728"/>"##,
            px(x as f64),
            py(y)
        );
    }
    // Legend.
    let lx = LEFT + pw - 150.0;
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#1f77b4" stroke-width="2"/><text x="{:.1}" y="{:.1}">train loss</text>"##,
        TOP + 14.0,
        lx + 20.0,
        TOP + 14.0,
        lx + 26.0,
        TOP + 18.0
    );
    if !eval.is_empty() {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#d62728"/><text x="{:.1}" y="{:.1}">eval loss</text>"##,
            lx + 10.0,
            TOP + 32.0,
            lx + 26.0,
            TOP + 36.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Escapes text for SVG.
fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(1.3, 2.1, 4);
        assert_eq!(t.len(), 4, "{t:?}");
        assert!(
            (t[0] - 1.4).abs() < 1e-9 && (t[3] - 2.0).abs() < 1e-9,
            "{t:?}"
        );
    }

    #[test]
    fn svg_has_the_curve_and_the_eval_points() {
        let train: Vec<(usize, f64)> = (1..=20).map(|s| (s, 3.0 / s as f64)).collect();
        let svg = loss_curve_svg("run <1>", &train, &[(10, 0.5), (20, 0.3)]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 3); // two points and the legend
        assert!(svg.contains("run &lt;1&gt;"));
        assert!(loss_curve_svg("empty", &[], &[]).contains("no data"));
    }
}
