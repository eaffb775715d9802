//! One SVG bar chart per workload.

/// A bar chart of `bars` (name, value in `unit`), titled `title`.
pub fn bars(title: &str, unit: &str, bars: &[(&str, f64)]) -> String {
    const W: f64 = 560.0;
    const ROW: f64 = 34.0;
    const L: f64 = 170.0;
    let h = 50.0 + ROW * bars.len() as f64;
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"18\">{title}: {unit} (native speed, synthetic guest driver)</text>\n"
    );
    let colors = ["#1f77b4", "#d62728", "#7f7f7f"];
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 34.0 + ROW * i as f64;
        let w = (W - L - 90.0) * v / max;
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{name}</text>\
             <rect x=\"{L}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"22\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{v:.0}</text>\n",
            L - 8.0,
            y + 15.0,
            colors[i % colors.len()],
            L + w + 6.0,
            y + 15.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
