//! The SVG plot of the pause distributions.

use crate::device::DeviceReport;

/// An SVG plot of each device's pause distribution (CDF, log-scale µs).
pub fn plot(reports: &[DeviceReport]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const L: f64 = 60.0;
    const B: f64 = 40.0;
    // 10 µs .. 100 ms on a log axis.
    let x = |us: f64| L + (us.max(10.0).log10() - 1.0) / 4.0 * (W - L - 20.0);
    let y = |q: f64| H - B - q * (H - B - 20.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{L}\" y=\"14\">pause, CDF (the VMM's hand-over code, synthetic guest, native speed)</text>\n"
    );
    for (us, label) in [
        (10.0, "10 µs"),
        (100.0, "100 µs"),
        (1000.0, "1 ms"),
        (10_000.0, "10 ms"),
        (100_000.0, "100 ms"),
    ] {
        svg.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{label}</text>\n",
            x(us),
            y(0.0),
            y(1.0),
            H - B + 16.0
        ));
    }
    for q in [0.0, 0.5, 0.99, 1.0] {
        svg.push_str(&format!(
            "<line x1=\"{L}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{2:.1}\" y=\"{0:.1}\" text-anchor=\"end\">{q}</text>\n",
            y(q),
            W - 20.0,
            L - 6.0
        ));
    }
    for (i, r) in reports.iter().enumerate() {
        let mut us: Vec<f64> = r.pause.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(|a, b| a.total_cmp(b));
        let n = us.len().max(1) as f64;
        let points: Vec<String> = us
            .iter()
            .enumerate()
            .map(|(k, v)| format!("{:.1},{:.1}", x(*v), y((k + 1) as f64 / n)))
            .collect();
        let color = ["#1f77b4", "#d62728"][i % 2];
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{} ({} upgrades)</text>\n",
            points.join(" "),
            L + 10.0,
            40.0 + 16.0 * i as f64,
            r.name,
            r.pause.len()
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
