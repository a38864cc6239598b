//! The picture: a header, then one row a VM with two panels.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::model::{Parsed, Session, Timeline};
use crate::{Options, ReportError, Summary};

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Res<T = ()> = Result<T, ReportError>;

const FONT: &str = "sans-serif";
const MIB: f64 = 1024.0 * 1024.0;
const HEADER_H: u32 = 118;
const ROW_TITLE_H: u32 = 30;
/// Points drawn a series at most (a long timeline is sampled: it is
/// cumulative, so sampling loses no total).
const MAX_POINTS: usize = 1200;

const GREY: RGBColor = RGBColor(90, 90, 90);
const LIGHT: RGBColor = RGBColor(232, 232, 232);
const BAR: RGBColor = RGBColor(70, 130, 180);
const P50: RGBColor = RGBColor(0, 130, 60);
const P99: RGBColor = RGBColor(190, 30, 120);

/// The causes a page is mapped for, bottom to top in the stack.
#[derive(Clone, Copy)]
enum Cause {
    OnDemand,
    FaultAround,
    Readahead,
    Prefetch,
    Background,
}

const CAUSES: [Cause; 5] = [
    Cause::OnDemand,
    Cause::FaultAround,
    Cause::Readahead,
    Cause::Prefetch,
    Cause::Background,
];

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Cause::OnDemand => "on demand",
            Cause::FaultAround => "fault-around",
            Cause::Readahead => "readahead",
            Cause::Prefetch => "prefetch",
            Cause::Background => "background",
        }
    }

    fn color(self) -> RGBColor {
        match self {
            Cause::OnDemand => RGBColor(214, 39, 40),
            Cause::FaultAround => RGBColor(255, 150, 40),
            Cause::Readahead => RGBColor(230, 200, 40),
            Cause::Prefetch => RGBColor(60, 170, 60),
            Cause::Background => RGBColor(80, 140, 210),
        }
    }

    fn series(self, t: &Timeline) -> &[u64] {
        match self {
            Cause::OnDemand => &t.on_demand,
            Cause::FaultAround => &t.fault_around,
            Cause::Readahead => &t.readahead,
            Cause::Prefetch => &t.prefetch,
            Cause::Background => &t.background,
        }
    }

    fn total(self, s: &Session) -> u64 {
        let st = &s.stats;
        match self {
            Cause::OnDemand => st.pages_on_demand,
            Cause::FaultAround => st.pages_fault_around,
            Cause::Readahead => st.pages_readahead,
            Cause::Prefetch => st.pages_prefetched,
            Cause::Background => st.pages_background,
        }
    }
}

fn draw_err<E: std::fmt::Debug>(e: E) -> ReportError {
    ReportError::Draw(format!("{e:?}"))
}

pub(crate) fn draw(parsed: &Parsed, opts: &Options) -> Res<(String, Summary)> {
    let sessions = &parsed.sessions;
    let drawn = sessions.len().min(opts.max_vms.max(1));
    let width = opts.width.max(900);
    let row_h = opts.row_height.max(220);
    let rows = u32::try_from(drawn).unwrap_or(u32::MAX);
    let height = HEADER_H
        .saturating_add(row_h.saturating_mul(rows))
        .saturating_add(10);
    let summary = Summary {
        sessions: sessions.len(),
        drawn,
        left_out: sessions.len() - drawn,
        skipped_lines: parsed.skipped_lines.clone(),
        width,
        height,
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (header, body) = root.split_vertically(HEADER_H);
        draw_header(&header, sessions, &summary, opts)?;
        let body = body.margin(0, 10, 0, 0);
        let rows = body.split_evenly((drawn, 1));
        for (area, s) in rows.iter().zip(sessions.iter()) {
            draw_row(area, s)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok((svg, summary))
}

fn text(area: &Area, s: &str, (x, y): (i32, i32), size: u32, color: &RGBColor) -> Res {
    let style = TextStyle::from((FONT, size).into_font()).color(color);
    area.draw(&Text::new(s.to_string(), (x, y), style))
        .map_err(draw_err)
}

fn bold(area: &Area, s: &str, (x, y): (i32, i32), size: u32) -> Res {
    let style = TextStyle::from((FONT, size, FontStyle::Bold).into_font()).color(&BLACK);
    area.draw(&Text::new(s.to_string(), (x, y), style))
        .map_err(draw_err)
}

fn draw_header(area: &Area, sessions: &[Session], summary: &Summary, opts: &Options) -> Res {
    let title = opts
        .title
        .clone()
        .unwrap_or_else(|| "pagewire restore report".to_string());
    let mut first = format!("{title} — {}", plural(sessions.len() as u64, "VM", "VMs"));
    if summary.left_out > 0 {
        first.push_str(&format!(
            " (the first {} drawn, {} left out)",
            summary.drawn, summary.left_out
        ));
    }
    bold(area, &first, (14, 10), 20)?;

    let sum = |f: &dyn Fn(&Session) -> u64| sessions.iter().map(f).fold(0u64, u64::saturating_add);
    let faults = sum(&|s| s.stats.faults);
    let pages = sum(&|s| s.pages_mapped());
    let bytes: f64 = sessions
        .iter()
        .map(|s| s.pages_mapped() as f64 * s.page_bytes())
        .sum();
    let duration: f64 = sessions.iter().map(|s| finite(s.duration_ms)).sum();
    let longest = sessions
        .iter()
        .map(|s| finite(s.duration_ms))
        .fold(0.0, f64::max);
    let blocktime: f64 = sessions.iter().map(|s| finite(s.stats.blocktime_us)).sum();
    let worst_p99 = sessions
        .iter()
        .map(|s| finite(s.stats.first_touch_latency.p99_us))
        .fold(0.0, f64::max);
    let mut second = format!(
        "totals: {} mapped ({} pages) · {} · blocked on faults {} · session time {} (longest {})",
        fmt_bytes(bytes),
        group(pages),
        plural(faults, "fault", "faults"),
        fmt_us(blocktime),
        fmt_ms(duration),
        fmt_ms(longest),
    );
    if worst_p99 > 0.0 {
        second.push_str(&format!(" · worst first-touch p99 {}", fmt_us(worst_p99)));
    }
    text(area, &second, (14, 40), 14, &BLACK)?;

    let mut third = String::from("pages by cause:");
    for c in CAUSES {
        third.push_str(&format!(" {} {} ·", c.label(), group(sum(&|s| c.total(s)))));
    }
    third.pop();
    if !summary.skipped_lines.is_empty() {
        third.push_str(&format!(
            "· {} skipped (malformed)",
            plural(summary.skipped_lines.len() as u64, "line", "lines")
        ));
    }
    text(area, third.trim_end(), (14, 62), 14, &GREY)?;

    // The legend, the same for every row.
    let y = 90;
    let mut x = 14;
    text(area, "left:", (x, y), 13, &GREY)?;
    x += 36;
    for c in CAUSES {
        area.draw(&Rectangle::new(
            [(x, y + 1), (x + 14, y + 13)],
            c.color().filled(),
        ))
        .map_err(draw_err)?;
        text(area, c.label(), (x + 19, y), 13, &BLACK)?;
        x += 19 + text_w(c.label(), 13) + 14;
    }
    area.draw(&PathElement::new(
        vec![(x, y + 7), (x + 22, y + 7)],
        BLACK.stroke_width(2),
    ))
    .map_err(draw_err)?;
    let faults_label = "faults (cumulative, right axis)";
    text(area, faults_label, (x + 27, y), 13, &BLACK)?;
    x += 27 + text_w(faults_label, 13) + 30;
    text(area, "right:", (x, y), 13, &GREY)?;
    x += 42;
    area.draw(&Rectangle::new(
        [(x, y + 1), (x + 14, y + 13)],
        BAR.filled(),
    ))
    .map_err(draw_err)?;
    text(area, "first-touch latency", (x + 19, y), 13, &BLACK)?;
    Ok(())
}

fn draw_row(area: &Area, s: &Session) -> Res {
    let (w, _) = area.dim_in_pixel();
    area.draw(&PathElement::new(
        vec![(0, 1), (w as i32, 1)],
        RGBColor(190, 190, 190).stroke_width(1),
    ))
    .map_err(draw_err)?;
    let (title, body) = area.split_vertically(ROW_TITLE_H);
    let name = s.label();
    bold(&title, &name, (14, 8), 15)?;
    let mut facts = Vec::new();
    if let Some(pid) = s.pid {
        facts.push(format!("pid {pid}"));
    }
    if let Some(snap) = &s.snapshot {
        facts.push(format!("snapshot {snap}"));
    }
    let mut dur = fmt_ms(s.duration_ms);
    if let Some(r) = &s.reason {
        dur.push_str(&format!(" ({r})"));
    }
    facts.push(dur);
    facts.push(plural(s.stats.faults, "fault", "faults"));
    facts.push(format!(
        "{} mapped ({} pages)",
        fmt_bytes(s.pages_mapped() as f64 * s.page_bytes()),
        group(s.pages_mapped())
    ));
    facts.push(format!("blocked {}", fmt_us(s.stats.blocktime_us)));
    if s.stats.pages_poisoned > 0 {
        facts.push(format!("{} poisoned", group(s.stats.pages_poisoned)));
    }
    let x = 14 + text_w(&name, 15) + 14;
    text(&title, &facts.join(" · "), (x, 9), 14, &BLACK)?;

    let split = (w as f64 * 0.58) as u32;
    let (left, right) = body.split_horizontally(split);
    draw_timeline(&left, s)?;
    draw_latency(&right, s)?;
    Ok(())
}

fn caption_style() -> TextStyle<'static> {
    TextStyle::from((FONT, 13).into_font()).color(&GREY)
}

fn note(area: &Area, caption: &str, msg: &str) -> Res {
    let (w, h) = area.dim_in_pixel();
    let style = caption_style();
    area.draw(&Text::new(
        caption.to_string(),
        (w as i32 / 2, 4),
        style.pos(Pos::new(HPos::Center, VPos::Top)),
    ))
    .map_err(draw_err)?;
    area.draw(&Rectangle::new(
        [(50, 24), (w as i32 - 20, h as i32 - 40)],
        LIGHT.stroke_width(1),
    ))
    .map_err(draw_err)?;
    let style = TextStyle::from((FONT, 14).into_font())
        .color(&GREY)
        .pos(Pos::new(HPos::Center, VPos::Center));
    area.draw(&Text::new(
        msg.to_string(),
        (w as i32 / 2, h as i32 / 2),
        style,
    ))
    .map_err(draw_err)
}

/// Cumulative sums, one value a bucket.
fn cumulative(v: &[u64], len: usize) -> Vec<f64> {
    let mut acc = 0.0;
    (0..len)
        .map(|i| {
            acc += v.get(i).copied().unwrap_or(0) as f64;
            acc
        })
        .collect()
}

fn draw_timeline(area: &Area, s: &Session) -> Res {
    let caption = "memory mapped since the session started, by cause (stacked, cumulative)";
    let Some(t) = &s.stats.timeline else {
        return note(area, caption, "no timeline in this record");
    };
    let bucket_ms = if t.bucket_ms.is_finite() && t.bucket_ms > 0.0 {
        t.bucket_ms
    } else {
        1.0
    };
    let all = [
        &t.faults[..],
        &t.on_demand,
        &t.fault_around,
        &t.readahead,
        &t.prefetch,
        &t.background,
    ];
    // Up to the last bucket with anything in it.
    let len = all
        .iter()
        .filter_map(|v| v.iter().rposition(|&n| n > 0))
        .max()
        .map_or(0, |i| i + 1);
    if len == 0 {
        return note(area, caption, "nothing mapped: the timeline is empty");
    }
    // MiB, or KiB when less than a MiB was mapped.
    let pages_max: f64 = CAUSES
        .iter()
        .map(|c| c.series(t).iter().take(len).map(|&n| n as f64).sum::<f64>())
        .sum();
    let (unit, unit_name) = if pages_max * s.page_bytes() < MIB {
        (1024.0, "KiB mapped")
    } else {
        (MIB, "MiB mapped")
    };
    let mib_a_page = s.page_bytes() / unit;
    // stacks[k]: the causes 0..=k added up, in MiB.
    let mut stacks: Vec<(Cause, Vec<f64>)> = Vec::new();
    let mut below = vec![0.0; len];
    for c in CAUSES {
        let cum = cumulative(c.series(t), len);
        if cum.last().copied().unwrap_or(0.0) <= 0.0 {
            continue;
        }
        let top: Vec<f64> = below
            .iter()
            .zip(&cum)
            .map(|(b, v)| b + v * mib_a_page)
            .collect();
        below.clone_from(&top);
        stacks.push((c, top));
    }
    let faults = cumulative(&t.faults, len);
    let y_max = below.iter().copied().fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.08 } else { 1.0 };
    let f_max = faults.last().copied().unwrap_or(0.0);
    let f_max = if f_max > 0.0 { f_max * 1.08 } else { 1.0 };
    let x_end = len as f64 * bucket_ms;
    if !(x_end.is_finite() && y_max.is_finite() && f_max.is_finite()) {
        return note(area, caption, "the timeline's numbers are out of range");
    }
    let step = len.div_ceil(MAX_POINTS).max(1);
    let points = |v: &[f64]| -> Vec<(f64, f64)> {
        let mut p = vec![(0.0, 0.0)];
        p.extend(
            v.iter()
                .enumerate()
                .filter(|(i, _)| (i + 1) % step == 0 || i + 1 == len)
                .map(|(i, y)| ((i + 1) as f64 * bucket_ms, *y)),
        );
        p
    };

    let mut chart = ChartBuilder::on(area)
        .caption(caption, caption_style())
        .margin_left(6)
        .margin_right(4)
        .margin_top(0)
        .margin_bottom(4)
        .x_label_area_size(38)
        .y_label_area_size(62)
        .right_y_label_area_size(58)
        .build_cartesian_2d(0.0..x_end, 0.0..y_max)
        .map_err(draw_err)?
        .set_secondary_coord(0.0..x_end, 0.0..f_max);
    chart
        .configure_mesh()
        .light_line_style(LIGHT)
        .bold_line_style(RGBColor(215, 215, 215))
        .max_light_lines(2)
        .x_labels(8)
        .y_labels(6)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .x_desc("ms since the session started")
        .y_desc(unit_name)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 12))
        .draw()
        .map_err(draw_err)?;
    chart
        .configure_secondary_axes()
        .y_labels(6)
        .y_label_formatter(&|v| count_tick(*v))
        .y_desc("faults")
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 12))
        .draw()
        .map_err(draw_err)?;
    // The tallest stack first: each lower one covers its part of it.
    for (c, top) in stacks.iter().rev() {
        chart
            .draw_series(AreaSeries::new(points(top), 0.0, c.color().filled()))
            .map_err(draw_err)?;
    }
    if f_max > 1.0 {
        chart
            .draw_secondary_series(LineSeries::new(points(&faults), BLACK.stroke_width(2)))
            .map_err(draw_err)?;
    }
    Ok(())
}

fn draw_latency(area: &Area, s: &Session) -> Res {
    let lat = &s.stats.first_touch_latency;
    let mut caption = String::from("first-touch latency");
    if lat.count > 0 {
        caption.push_str(&format!(
            ": p50 {} · p90 {} · p99 {} · max {} · n {}",
            fmt_us(lat.p50_us),
            fmt_us(lat.p90_us),
            fmt_us(lat.p99_us),
            fmt_us(lat.max_us),
            group(lat.count)
        ));
    }
    // (log2 of the lower bound, log2 of the upper bound, count)
    let mut bars: Vec<(f64, f64, u64)> = Vec::new();
    let mut prev: Option<f64> = None;
    for b in &lat.buckets {
        if !(b.le_us.is_finite() && b.le_us > 0.0) {
            continue;
        }
        let hi = b.le_us.log2();
        let lo = match prev {
            Some(p) if p < hi => p,
            _ => hi - 1.0,
        };
        prev = Some(hi);
        bars.push((lo, hi, b.count));
    }
    let first = bars.iter().position(|b| b.2 > 0);
    let last = bars.iter().rposition(|b| b.2 > 0);
    let (Some(first), Some(last)) = (first, last) else {
        let msg = if lat.count > 0 {
            "no latency histogram in this record"
        } else {
            "no faults served on demand"
        };
        return note(area, &caption, msg);
    };
    // One empty bucket either side.
    let first = first.saturating_sub(1);
    let last = (last + 1).min(bars.len() - 1);
    let bars = &bars[first..=last];
    let x_min = bars.first().map_or(0.0, |b| b.0).floor();
    let x_max = bars.last().map_or(1.0, |b| b.1).ceil().max(x_min + 1.0);
    let c_max = bars.iter().map(|b| b.2).max().unwrap_or(1).max(1) as f64 * 1.18;
    if !(x_min.is_finite() && x_max.is_finite() && c_max.is_finite()) {
        return note(area, &caption, "the histogram's bounds are out of range");
    }
    let span = (x_max - x_min).round() as usize;
    let ticks = (span + 1).clamp(2, 9);

    let mut chart = ChartBuilder::on(area)
        .caption(&caption, caption_style())
        .margin_left(16)
        .margin_right(18)
        .margin_top(0)
        .margin_bottom(4)
        .x_label_area_size(38)
        .y_label_area_size(52)
        .build_cartesian_2d(x_min..x_max, 0.0..c_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .light_line_style(LIGHT)
        .bold_line_style(RGBColor(215, 215, 215))
        .disable_x_mesh()
        .max_light_lines(2)
        .x_labels(ticks)
        .y_labels(6)
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-6 {
                fmt_us(v.exp2())
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| count_tick(*v))
        .x_desc("from the fault message to the page mapped (log2 buckets)")
        .y_desc("faults")
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 12))
        .draw()
        .map_err(draw_err)?;
    // A bar of a few faults stays visible next to one of thousands.
    let min_h = c_max * 0.008;
    chart
        .draw_series(bars.iter().filter(|b| b.2 > 0).map(|&(lo, hi, n)| {
            let pad = (hi - lo) * 0.06;
            Rectangle::new(
                [(lo + pad, 0.0), (hi - pad, (n as f64).max(min_h))],
                BAR.filled(),
            )
        }))
        .map_err(draw_err)?;
    // Counts above the bars, where a bar is wide enough for its label.
    let label_style = TextStyle::from((FONT, 11).into_font())
        .color(&GREY)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for &(lo, hi, n) in bars.iter().filter(|b| b.2 > 0) {
        let label = compact(n as f64);
        let px = chart.backend_coord(&(hi, 0.0)).0 - chart.backend_coord(&(lo, 0.0)).0;
        if px >= text_w(&label, 11) + 6 {
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    ((lo + hi) / 2.0, (n as f64).max(min_h) + c_max * 0.01),
                    label_style.clone(),
                )))
                .map_err(draw_err)?;
        }
    }
    // p50 and p99 as vertical lines, labelled at different heights.
    for (label, v, color, at) in [
        ("p50", lat.p50_us, P50, 0.97),
        ("p99", lat.p99_us, P99, 0.88),
    ] {
        if !(v.is_finite() && v > 0.0) {
            continue;
        }
        let x = v.log2().clamp(x_min, x_max);
        // The label to the right of the line, or to its left near the edge.
        let right_side = x < x_max - (x_max - x_min) * 0.25;
        let (text, h) = if right_side {
            (format!(" {label} {}", fmt_us(v)), HPos::Left)
        } else {
            (format!("{label} {} ", fmt_us(v)), HPos::Right)
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, c_max * at)],
                color.stroke_width(2),
            )))
            .map_err(draw_err)?;
        let style = TextStyle::from((FONT, 12, FontStyle::Bold).into_font())
            .color(&color)
            .pos(Pos::new(h, VPos::Center));
        chart
            .draw_series(std::iter::once(Text::new(text, (x, c_max * at), style)))
            .map_err(draw_err)?;
    }
    Ok(())
}

fn finite(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// A rough width of text in pixels (sans-serif).
fn text_w(s: &str, size: u32) -> i32 {
    (s.chars().count() as f64 * size as f64 * 0.52).round() as i32
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", group(n), if n == 1 { one } else { many })
}

/// 1234567 as "1,234,567".
pub(crate) fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A number with up to two decimals, trailing zeros dropped.
fn trim(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// An axis tick: as few decimals as it needs.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim(v, 2)
    } else {
        // Two significant figures at most.
        let decimals = (-a.log10()).ceil().clamp(0.0, 6.0) as usize + 1;
        trim(v, decimals)
    }
}

/// A tick on an axis of counts: none between whole numbers.
fn count_tick(v: f64) -> String {
    if (v - v.round()).abs() > 1e-9 {
        String::new()
    } else {
        compact(v)
    }
}

/// 12000 as "12k", 3500000 as "3.5M".
fn compact(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6, 1))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3, 1))
    } else {
        tick(v)
    }
}

/// A duration in ms: "812.5 ms", "4213 ms", "12.3 s".
pub(crate) fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        return "? ms".into();
    }
    if ms < 1000.0 {
        format!("{} ms", trim(ms, 1))
    } else if ms < 10_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{} s", trim(ms / 1000.0, 1))
    }
}

/// A latency: "30 µs", "1.5 ms", "2 s" (two significant figures or more).
pub(crate) fn fmt_us(us: f64) -> String {
    if !us.is_finite() {
        return "? µs".into();
    }
    let short = |v: f64| {
        if v >= 10.0 {
            format!("{v:.0}")
        } else {
            trim(v, 1)
        }
    };
    if us < 1.0 {
        format!("{} µs", trim(us, 2))
    } else if us < 1000.0 {
        format!("{} µs", short(us))
    } else if us < 1e6 {
        format!("{} ms", short(us / 1e3))
    } else {
        format!("{} s", short(us / 1e6))
    }
}

/// Bytes in MiB (KiB under 1 MiB, GiB from 10 GiB).
pub(crate) fn fmt_bytes(b: f64) -> String {
    let mib = b / MIB;
    if mib < 1.0 {
        format!("{} KiB", trim(b / 1024.0, 1))
    } else if mib >= 10240.0 {
        format!("{} GiB", trim(mib / 1024.0, 1))
    } else if mib >= 100.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{} MiB", trim(mib, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(group(0), "0");
        assert_eq!(group(1379), "1,379");
        assert_eq!(group(268435456), "268,435,456");
        assert_eq!(fmt_ms(812.5), "812.5 ms");
        assert_eq!(fmt_ms(4213.4), "4213 ms");
        assert_eq!(fmt_ms(12345.0), "12.3 s");
        assert_eq!(fmt_us(30.0), "30 µs");
        assert_eq!(fmt_us(1024.0), "1 ms");
        assert_eq!(fmt_us(4096.0), "4.1 ms");
        assert_eq!(fmt_us(0.5), "0.5 µs");
        assert_eq!(fmt_bytes(268435456.0), "256 MiB");
        assert_eq!(fmt_bytes(1.5 * MIB), "1.5 MiB");
        assert_eq!(compact(12000.0), "12k");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(250.0), "250");
        assert_eq!(tick(0.015), "0.015");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(count_tick(1.5), "");
        assert_eq!(count_tick(1500.0), "1.5k");
        assert_eq!(fmt_bytes(12288.0), "12 KiB");
    }
}
