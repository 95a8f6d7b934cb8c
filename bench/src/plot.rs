//! Line charts as standalone SVG: no plotting dependency, readable in any browser.

use std::fmt::Write as _;

const W: f64 = 760.0;
const H: f64 = 380.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// A chart of named series (`(name, xs, ys)`), each drawn as a polyline.
#[must_use]
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<f64>, Vec<f64>)],
) -> String {
    let finite = |v: &f64| v.is_finite();
    let xmax = series.iter().flat_map(|s| s.1.iter()).copied().filter(finite).fold(0.0, f64::max);
    let ymax = series.iter().flat_map(|s| s.2.iter()).copied().filter(finite).fold(0.0, f64::max);
    let (xmax, ymax) = (nice(xmax), nice(ymax));
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / xmax * pw;
    let sy = |y: f64| TOP + ph - y / ymax * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let (x, y) = (sx(f * xmax), sy(f * ymax));
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt(f * ymax)
        );
        let _ = writeln!(
            o,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 18.0,
            fmt(f * xmax)
        );
    }
    let _ = writeln!(
        o,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 10.0,
        esc(x_label)
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (k, (name, xs, ys)) in series.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        // A missing value (NaN) breaks the line rather than drawing it at zero.
        let points: Vec<(f64, f64)> = xs.iter().copied().zip(ys.iter().copied()).collect();
        for run in points.split(|(x, y)| !(x.is_finite() && y.is_finite())) {
            match run {
                [] => {}
                [(x, y)] => {
                    let _ = writeln!(
                        o,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{c}"/>"#,
                        sx(*x),
                        sy(*y)
                    );
                }
                _ => {
                    let pts: Vec<String> =
                        run.iter().map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
                    let _ = writeln!(
                        o,
                        r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                        pts.join(" ")
                    );
                }
            }
        }
        let ly = TOP + 10.0 + k as f64 * 18.0;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"/>"#,
            lx + 18.0
        );
        let _ = writeln!(o, r#"<text x="{}" y="{}">{}</text>"#, lx + 24.0, ly + 4.0, esc(name));
    }
    o.push_str("</svg>\n");
    o
}

/// A round upper bound for an axis.
fn nice(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_values_break_the_line() {
        let svg = lines(
            "t <1>",
            "x",
            "y",
            &[("a".into(), vec![1.0, 2.0, 3.0, 4.0, 5.0], vec![1.0, 2.0, f64::NAN, 4.0, 5.0])],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"), "titles are escaped");
        let lone = lines("t", "x", "y", &[("a".into(), vec![1.0, 2.0], vec![f64::NAN, 2.0])]);
        assert_eq!(lone.matches("<circle").count(), 1);
    }
}
