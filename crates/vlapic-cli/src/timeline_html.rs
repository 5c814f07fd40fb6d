//! Draws a [`Model`] as one self-contained HTML page: inline SVG lanes per vCPU with
//! nested handler bars by priority class, IPI arrows, pause bands, depth strips.
//!
//! Nothing external: the CSS and the few lines of script (zoom buttons, and a mark
//! that the browser laid the lanes out) are inline. A time window is drawn at one
//! pixel column per step: within a column each nesting level shows the highest class
//! in service, so a 3-second run stays a few thousand rectangles; the "closer look"
//! sections draw short windows where single handlers are wide enough to label.

use std::fmt::Write as _;

use crate::timeline::{Deepest, Model};

/// Drawing width of the time axis, pixels.
const WIDTH: f64 = 1500.0;
/// Left margin for lane labels.
const LEFT: f64 = 80.0;
/// Height of one nesting level.
const LEVEL: f64 = 9.0;
/// Top of the "VM paused" row.
const PAUSE_ROW: f64 = 16.0;
/// Height of the depth strip under each lane.
const STRIP: f64 = 18.0;

/// The colour of priority class `c` (1–15): blue (low) to red (high).
pub fn class_colour(c: u8) -> String {
    let c = f64::from(c.clamp(1, 15));
    let hue = 240.0 - (c - 1.0) * 240.0 / 14.0;
    format!("hsl({hue:.0},75%,48%)")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "1.234 ms" or "56.7 µs".
fn fmt_us(us: f64) -> String {
    if us.abs() >= 1000.0 {
        format!("{:.3} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

/// One drawn window of the run.
struct Window {
    t0: f64,
    t1: f64,
}

impl Window {
    fn x(&self, t: f64) -> f64 {
        let span = (self.t1 - self.t0).max(1e-9);
        LEFT + ((t - self.t0) / span * WIDTH).clamp(0.0, WIDTH)
    }
    fn col(&self, t: f64) -> usize {
        (self.x(t) - LEFT).floor().clamp(0.0, WIDTH - 1.0) as usize
    }
}

/// Deepest level drawn per lane (at least 3, so lanes keep their size).
fn lane_depth(m: &Model, vcpu: usize) -> usize {
    m.handlers
        .iter()
        .filter(|h| h.vcpu == vcpu)
        .map(|h| usize::from(h.depth))
        .max()
        .unwrap_or(0)
        .max(3)
}

/// The SVG of one window: lanes, handlers, strips, IPIs, timer ticks, pauses, axis.
fn window_svg(m: &Model, w: &Window, id: &str, label: bool) -> String {
    let cols = WIDTH as usize;
    let depths: Vec<usize> = (0..m.vcpus).map(|i| lane_depth(m, i)).collect();
    let mut tops = Vec::with_capacity(m.vcpus);
    let mut y = PAUSE_ROW + 22.0;
    for d in &depths {
        tops.push(y);
        y += *d as f64 * LEVEL + STRIP + 14.0;
    }
    let height = y + 8.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg id="{id}" class="timeline" xmlns="http://www.w3.org/2000/svg" width="{}" height="{height:.0}" viewBox="0 0 {} {height:.0}">"#,
        LEFT + WIDTH + 10.0,
        LEFT + WIDTH + 10.0
    );
    s.push_str(r##"<defs><marker id="ah" markerWidth="6" markerHeight="6" refX="5" refY="3" orient="auto"><path d="M0,0 L6,3 L0,6 z" fill="#333"/></marker></defs>"##);
    axis(&mut s, w, height);
    // Per lane: one row of columns per depth (highest class), and the depth strip.
    for (i, top) in tops.iter().enumerate() {
        let d = depths.get(i).copied().unwrap_or(3);
        let _ = write!(s, r#"<g class="lane" data-vcpu="{i}">"#);
        let _ = write!(
            s,
            r#"<rect class="lane-bg" x="{LEFT}" y="{top:.1}" width="{WIDTH}" height="{:.1}"/><text class="lane-label" x="4" y="{:.1}">vCPU {i}</text>"#,
            d as f64 * LEVEL,
            top + 12.0
        );
        let mut grid = vec![vec![0u8; cols]; d];
        let mut depth_col = vec![0u8; cols];
        let mut singles = Vec::new();
        for h in m
            .handlers
            .iter()
            .filter(|h| h.vcpu == i && h.ts <= w.t1 && h.ts + h.dur >= w.t0)
        {
            let (x0, x1) = (w.x(h.ts), w.x(h.ts + h.dur));
            if label && x1 - x0 >= 3.0 {
                singles.push((h, x0, x1));
                continue;
            }
            let (c0, c1) = (w.col(h.ts), w.col(h.ts + h.dur));
            let level = usize::from(h.depth).saturating_sub(1);
            for c in c0..=c1 {
                if let Some(cell) = grid.get_mut(level).and_then(|r| r.get_mut(c)) {
                    *cell = (*cell).max(h.vector >> 4);
                }
                if let Some(dc) = depth_col.get_mut(c) {
                    *dc = (*dc).max(h.depth);
                }
            }
        }
        for (level, row) in grid.iter().enumerate() {
            let yy = top + (d - 1 - level) as f64 * LEVEL;
            let mut c = 0;
            while c < cols {
                let class = row[c];
                let start = c;
                while c < cols && row[c] == class {
                    c += 1;
                }
                if class > 0 {
                    let _ = write!(
                        s,
                        r#"<rect class="h" x="{:.1}" y="{yy:.1}" width="{}" height="{:.1}" fill="{}"><title>depth {}, class {class}</title></rect>"#,
                        LEFT + start as f64,
                        c - start,
                        LEVEL - 1.0,
                        class_colour(class),
                        level + 1
                    );
                }
            }
        }
        for (h, x0, x1) in singles {
            let level = usize::from(h.depth).saturating_sub(1).min(d - 1);
            let yy = top + (d - 1 - level) as f64 * LEVEL;
            let _ = write!(
                s,
                r#"<rect class="h" x="{x0:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{:#04x} on vCPU {i}, depth {}, from {}: {} at {}</title></rect>"#,
                (x1 - x0).max(1.0),
                LEVEL - 1.0,
                class_colour(h.vector >> 4),
                h.vector,
                h.depth,
                esc(&h.source),
                fmt_us(h.dur),
                fmt_us(h.ts)
            );
            if x1 - x0 >= 26.0 {
                let _ = write!(
                    s,
                    r#"<text class="vec" x="{:.1}" y="{:.1}">{:#04x}</text>"#,
                    x0 + 2.0,
                    yy + 7.0,
                    h.vector
                );
            }
            let (c0, c1) = (w.col(h.ts), w.col(h.ts + h.dur));
            for dc in depth_col.iter_mut().take(c1 + 1).skip(c0) {
                *dc = (*dc).max(h.depth);
            }
        }
        // Depth over time: a step path under the lane.
        let base = top + d as f64 * LEVEL + STRIP;
        let scale = (STRIP - 2.0) / d as f64;
        let mut p = format!("M{LEFT},{base:.1}");
        for (c, dv) in depth_col.iter().enumerate() {
            let yv = base - f64::from(*dv) * scale;
            let _ = write!(
                p,
                " L{:.0},{yv:.1} L{:.0},{yv:.1}",
                LEFT + c as f64,
                LEFT + c as f64 + 1.0
            );
        }
        let _ = write!(
            s,
            r#"<path class="depth" d="{p} L{:.0},{base:.1} z"><title>vCPU {i}: nesting depth over time</title></path>"#,
            LEFT + WIDTH
        );
        // Timer expiries and other marks, one tick per column.
        let mut seen = vec![0u8; cols];
        for k in m
            .marks
            .iter()
            .filter(|k| k.vcpu == i && k.ts >= w.t0 && k.ts <= w.t1)
        {
            let c = w.col(k.ts);
            let bit = match k.cat.as_str() {
                "timer" => 1,
                "verifier" => 4,
                _ => 2,
            };
            if seen[c] & bit != 0 {
                continue;
            }
            seen[c] |= bit;
            let x = LEFT + c as f64;
            let (cls, y0, y1) = match bit {
                1 => ("tick", top - 5.0, top - 1.0),
                4 => ("viol", top - 9.0, top + d as f64 * LEVEL),
                _ => ("evt", top - 9.0, top - 1.0),
            };
            let _ = write!(
                s,
                r#"<line class="{cls}" x1="{x}" y1="{y0:.1}" x2="{x}" y2="{y1:.1}"><title>{} at {}</title></line>"#,
                esc(&k.name),
                fmt_us(k.ts)
            );
        }
        s.push_str("</g>");
    }
    // IPIs: one arrow per (column, sender, receiver).
    let mut drawn = std::collections::BTreeMap::new();
    for p in m.ipis.iter().filter(|p| p.ts >= w.t0 && p.ts <= w.t1) {
        *drawn.entry((w.col(p.ts), p.from, p.to)).or_insert(0u32) += 1;
    }
    s.push_str(r#"<g class="ipis">"#);
    for ((c, f, t), n) in drawn {
        let (Some(yf), Some(yt)) = (tops.get(f), tops.get(t)) else {
            continue;
        };
        let x = LEFT + c as f64 + 0.5;
        let (df, dt) = (depths[f] as f64 * LEVEL, depths[t] as f64 * LEVEL);
        let (y0, y1) = if yf < yt {
            (yf + df, yt - 1.0)
        } else {
            (*yf - 1.0, yt + dt)
        };
        let _ = write!(
            s,
            r#"<line class="ipi" x1="{x:.1}" y1="{y0:.1}" x2="{:.1}" y2="{y1:.1}" marker-end="url(#ah)"><title>{n} IPI(s) vCPU {f} → vCPU {t}</title></line>"#,
            x + 3.0
        );
    }
    s.push_str("</g>");
    // Pauses: a faint band across every lane (at least a pixel wide) and a mark in
    // the "VM paused" row; darker when something was in service.
    let _ = write!(
        s,
        r#"<text class="lane-label" x="4" y="{:.0}">VM paused</text>"#,
        PAUSE_ROW + 7.0
    );
    for p in m
        .pauses
        .iter()
        .filter(|p| p.ts <= w.t1 && p.ts + p.dur >= w.t0)
    {
        let x0 = w.x(p.ts);
        let x1 = w.x(p.ts + p.dur).max(x0 + 1.5);
        let busy = p.isr.iter().any(|v| !v.is_empty());
        let _ = write!(
            s,
            r#"<rect class="{}" x="{x0:.1}" y="{PAUSE_ROW}" width="{:.1}" height="8"/>"#,
            if busy { "pmark busy" } else { "pmark" },
            x1 - x0
        );
        let isr: Vec<String> = p
            .isr
            .iter()
            .enumerate()
            .map(|(i, v)| format!("vCPU {i}: {}", if v.is_empty() { "-" } else { v }))
            .collect();
        let _ = write!(
            s,
            r#"<rect class="pause" x="{x0:.1}" y="{PAUSE_ROW}" width="{:.1}" height="{:.0}"><title>{} at {}: downtime {} µs; in service: {}</title></rect>"#,
            x1 - x0,
            height - PAUSE_ROW - 4.0,
            esc(&p.kind),
            fmt_us(p.ts),
            p.downtime_us,
            esc(&isr.join("; "))
        );
    }
    s.push_str("</svg>");
    s
}

/// An axis label with as many decimals as the step needs.
fn axis_label(t: f64, step: f64) -> String {
    let (v, st, unit) = if step >= 1000.0 {
        (t / 1000.0, step / 1000.0, "ms")
    } else {
        (t, step, "µs")
    };
    let decimals = if st >= 1.0 {
        0
    } else {
        (-st.log10().floor()) as usize
    };
    format!("{v:.decimals$} {unit}")
}

/// Time axis labels along the top.
fn axis(s: &mut String, w: &Window, height: f64) {
    let span = (w.t1 - w.t0).max(1e-9);
    let raw = span / 10.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|k| k * mag)
        .find(|st| *st >= raw)
        .unwrap_or(raw);
    let mut t = (w.t0 / step).ceil() * step;
    while t <= w.t1 {
        let x = w.x(t);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{x:.1}" y1="14" x2="{x:.1}" y2="{height:.0}"/><text class="axis" x="{:.1}" y="11">{}</text>"#,
            x + 2.0,
            axis_label(t, step)
        );
        t += step;
    }
}

const CSS: &str = "body{font:13px system-ui,sans-serif;margin:16px;color:#222}\
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 4px}\
.sum{color:#444;margin:2px 0 8px}.scroll{overflow-x:auto;border:1px solid #ccc}\
.lane-bg{fill:#f6f6f6}.lane-label{font-size:12px;font-weight:600}\
.depth{fill:#9aa;stroke:#567;stroke-width:.5}.ipi{stroke:#333;stroke-width:.7;opacity:.55}\
.pause{fill:#f0a500;opacity:.13}.pmark{fill:#f0a500}.busy{fill:#d03000}.tick{stroke:#0a0;stroke-width:1}.evt{stroke:#a0a;stroke-width:2}\
.viol{stroke:#e00;stroke-width:2}.grid{stroke:#ddd;stroke-width:.5}.axis{font-size:10px;fill:#555}\
.vec{font-size:7px;fill:#fff}.legend span{display:inline-block;margin:2px 10px 2px 0}\
.sw{display:inline-block;width:14px;height:10px;vertical-align:middle;margin-right:3px}\
pre{background:#f6f6f6;padding:8px;font-size:12px}button{margin-right:4px}";

/// The page's own script: zoom buttons, and `data-lanes-rendered` on the body once
/// the browser has laid out the lanes (the browser test reads it from the DOM).
const SCRIPT: &str = "(function(){\
var svgs=document.querySelectorAll('svg.timeline');\
var lanes=document.querySelectorAll('#overview g.lane'),ok=0;\
lanes.forEach(function(g){var b=g.getBBox();if(b.width>0&&b.height>0)ok++;});\
document.body.setAttribute('data-lanes-rendered',String(ok));\
document.body.setAttribute('data-handlers-rendered',String(document.querySelectorAll('rect.h').length));\
document.querySelectorAll('button[data-zoom]').forEach(function(b){b.onclick=function(){\
var s=document.getElementById(b.getAttribute('data-for'));var k=parseFloat(b.getAttribute('data-zoom'));\
var w0=parseFloat(s.getAttribute('data-w0')||s.getAttribute('width'));s.setAttribute('data-w0',w0);\
var cur=parseFloat(s.getAttribute('width'));var nw=k>0?cur*k:w0;\
var h0=parseFloat(s.getAttribute('data-h0')||s.getAttribute('height'));s.setAttribute('data-h0',h0);\
s.setAttribute('width',nw);s.setAttribute('preserveAspectRatio','none');s.setAttribute('height',h0);};});\
})();";

/// The "closer look" windows: around the deepest nesting of each vCPU that nested
/// (its outermost handler, with a margin), at most three.
fn closer_windows(m: &Model) -> Vec<(String, Window)> {
    let mut out = Vec::new();
    let mut deep: Vec<(usize, Deepest)> = m
        .deepest()
        .into_iter()
        .enumerate()
        .filter(|(_, d)| d.0 >= 2)
        .collect();
    deep.sort_by_key(|d| std::cmp::Reverse(d.1 .0));
    for (vcpu, (depth, vs, ts)) in deep.into_iter().take(3) {
        let outer = m
            .handlers
            .iter()
            .filter(|h| h.vcpu == vcpu && h.depth == 1 && h.ts <= ts && h.ts + h.dur >= ts)
            .max_by(|a, b| a.dur.total_cmp(&b.dur));
        let (a, b) = outer.map_or((ts - 50.0, ts + 50.0), |h| (h.ts, h.ts + h.dur));
        let margin = ((b - a) * 0.08).max(2.0);
        let chain: Vec<String> = vs.iter().map(|v| format!("{v:#04x}")).collect();
        out.push((
            format!(
                "vCPU {vcpu}: depth {depth} ({}) at {}",
                chain.join(" > "),
                fmt_us(ts)
            ),
            Window {
                t0: a - margin,
                t1: b + margin,
            },
        ));
    }
    out
}

/// The whole page.
pub fn page(m: &Model, title: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>vlapic timeline: {}</title><style>{CSS}</style></head><body>",
        esc(title)
    );
    let _ = write!(s, "<h1>Interrupt timeline — {}</h1>", esc(title));
    let get = |k: &str| m.summary.get(k).cloned().unwrap_or_else(|| "?".into());
    let _ = write!(
        s,
        "<p class=\"sum\">{} vCPUs, {} of VM time; {} handlers, {} IPIs, {} pauses (run: {} migrations, deepest nesting {}, {} verifier violations).</p>",
        m.vcpus,
        fmt_us(m.span.1 - m.span.0),
        m.handlers.len(),
        m.ipis.len(),
        m.pauses.len(),
        esc(&get("migrations")),
        esc(&get("max_nesting")),
        esc(&get("violations"))
    );
    s.push_str("<div class=\"legend\">");
    for c in 1..=15u8 {
        let _ = write!(
            s,
            "<span><i class=\"sw\" style=\"background:{}\"></i>class {c:X} (0x{c:X}0–0x{c:X}f)</span>",
            class_colour(c)
        );
    }
    s.push_str(
        "<br><span>bars: a handler from acknowledge to EOI, one row per nesting level (deeper rows above)</span>\
<span><i class=\"sw\" style=\"background:#9aa\"></i>depth over time</span>\
<span>↘ IPI sender → receiver</span><span><i class=\"sw\" style=\"background:#0a0;width:2px\"></i>timer expiry</span>\
<span><i class=\"sw\" style=\"background:#a0a;width:3px\"></i>NMI/INIT/SIPI</span>\
<span><i class=\"sw\" style=\"background:#e00;width:3px\"></i>verifier violation</span>\
<span><i class=\"sw\" style=\"background:#f0a500\"></i>VM paused (migration, save, restore; hover: ISR per vCPU)</span>\
<span><i class=\"sw\" style=\"background:#d03000\"></i>paused with an interrupt in service</span></div>",
    );
    s.push_str("<h2>Whole run</h2><p class=\"sum\">Each pixel column shows, per nesting level, the highest class in service; hover for details. \
<button data-zoom=\"2\" data-for=\"overview\">zoom ×2</button><button data-zoom=\"0\" data-for=\"overview\">reset</button></p>");
    let whole = Window {
        t0: m.span.0,
        t1: m.span.1.max(m.span.0 + 1.0),
    };
    s.push_str("<div class=\"scroll\">");
    s.push_str(&window_svg(m, &whole, "overview", false));
    s.push_str("</div>");
    for (i, (what, w)) in closer_windows(m).into_iter().enumerate() {
        let _ = write!(
            s,
            "<h2>Closer look: {} ({} window)</h2><div class=\"scroll\">",
            esc(&what),
            fmt_us(w.t1 - w.t0)
        );
        s.push_str(&window_svg(m, &w, &format!("closer{i}"), true));
        s.push_str("</div>");
    }
    let _ = write!(s, "<h2>Digest</h2><pre>{}</pre>", esc(&m.digest()));
    let _ = writeln!(s, "<script>{SCRIPT}</script></body></html>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Model {
        Model::parse(crate::timeline::tests::SAMPLE.as_bytes()).unwrap()
    }

    #[test]
    fn page_has_a_lane_per_vcpu_and_nothing_external() {
        let html = page(&sample(), "t");
        assert_eq!(html.matches("<svg id=\"overview\"").count(), 1);
        let overview = &html[html.find("id=\"overview\"").unwrap()..];
        let overview = &overview[..overview.find("</svg>").unwrap()];
        assert_eq!(overview.matches("class=\"lane\"").count(), 2);
        assert!(overview.contains("data-vcpu=\"1\""));
        // No network: no external script, stylesheet, image or font.
        for bad in ["src=", "href=\"http", "@import", "url(http"] {
            assert!(!html.contains(bad), "{bad}");
        }
    }

    /// The 0x41 handler (class 4) and the nested 0x61 (class 6) are both drawn, in
    /// their class colours, and the closer look labels them.
    #[test]
    fn nested_handlers_are_drawn_in_class_colours() {
        let html = page(&sample(), "t");
        assert!(html.contains(&class_colour(4)) && html.contains(&class_colour(6)));
        assert!(
            html.contains("Closer look: vCPU 1: depth 2 (0x41 &gt; 0x61)"),
            "{html}"
        );
        assert!(html.contains("0x61 on vCPU 1, depth 2, from MSI"));
        assert!(html.contains("class=\"ipi\""));
        assert!(html.contains(
            "migration at 3.0 µs: downtime 800 µs; in service: vCPU 0: -; vCPU 1: 0x41 0x61"
        ));
    }

    #[test]
    fn colours_run_from_blue_to_red() {
        assert_eq!(class_colour(1), "hsl(240,75%,48%)");
        assert_eq!(class_colour(15), "hsl(0,75%,48%)");
        assert_eq!(class_colour(0), class_colour(1));
    }
}
