//! PNG plots of a bench run, drawn with plotters' bitmap backend. Text is
//! rendered with a TTF loaded from a file and registered with ab_glyph, so no
//! fontconfig is involved (`cargo xtask setup` installs fonts-dejavu-core).
use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::{coord::ranged1d::SegmentValue, prelude::*, style::register_font};

use crate::{
    end_to_end::{CLUSTER_IP, DIRECT, IPTABLES, NFTABLES, NODE_PORT_TC, PathResult, ROUTED},
    packet_cost::PacketCost,
};

const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers DejaVu Sans as plotters' "sans-serif" (once per process).
pub fn register_fonts() -> anyhow::Result<()> {
    let path = FONT_FILES
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("no DejaVuSans.ttf (apt-get install fonts-dejavu-core)"))?;
    let bytes = std::fs::read(path).with_context(|| path.to_string())?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a font ab_glyph can read"))
}

type CostOf = fn(&PacketCost) -> f64;
type RateOf = fn(&PathResult) -> f64;

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Per-packet cost against the number of Services (log scale).
pub fn packet_cost(costs: &[PacketCost], out: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let x_max = costs.iter().map(|c| c.services).max().unwrap_or(10) as f64 * 2.0;
    let y_max = costs
        .iter()
        .flat_map(|c| [c.first_hot_ns, c.first_uniform_ns, c.established_ns])
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Per-packet cost of the tc program (BPF_PROG_TEST_RUN, median of rounds)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((5f64..x_max).log_scale(), 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("Services (10 backends each)")
        .y_desc("ns per packet")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    let series: [(&str, RGBColor, CostOf); 3] = [
        (
            "first packet, 16 hot frontends (target row)",
            RGBColor(0, 110, 60),
            |c| c.first_hot_ns,
        ),
        (
            "first packet, frontends uniform over all (cache effect)",
            RGBColor(200, 120, 0),
            |c| c.first_uniform_ns,
        ),
        ("established flow", RGBColor(30, 80, 200), |c| {
            c.established_ns
        }),
    ];
    for (label, color, value) in series {
        let pts: Vec<(f64, f64)> = costs
            .iter()
            .map(|c| (c.services as f64, value(c)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn color_of(name: &str) -> RGBColor {
    match name {
        DIRECT | ROUTED => RGBColor(140, 140, 140),
        CLUSTER_IP | NODE_PORT_TC => RGBColor(0, 130, 70),
        IPTABLES => RGBColor(200, 60, 40),
        NFTABLES => RGBColor(220, 140, 0),
        // Paths added later (e.g. XDP) get their own colour.
        _ => RGBColor(40, 90, 200),
    }
}

/// Short-connection and kept-alive rates per path, one panel per number of
/// Services loaded; the no-Service baselines appear in every panel.
pub fn end_to_end(results: &[PathResult], sizes: &[u32], out: &Path) -> anyhow::Result<()> {
    let ok: Vec<&PathResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let root = BitMapBackend::new(out, (1700, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((2, sizes.len().max(1)));
    let metrics: [(&str, RateOf); 2] = [
        ("short connections/s", |r| r.short_rate),
        ("kept-alive requests/s", |r| r.kept_rate),
    ];
    for (row, (what, value)) in metrics.iter().enumerate() {
        let x_max = ok.iter().map(|r| value(r)).fold(1.0, f64::max) * 1.2;
        for (col, &n) in sizes.iter().enumerate() {
            let area = &panels[row * sizes.len() + col];
            let rows: Vec<&&PathResult> = ok
                .iter()
                .filter(|r| r.services == 0 || r.services == n)
                .collect();
            let labels: Vec<String> = rows.iter().map(|r| r.name.to_string()).collect();
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{what}, {n} Services loaded"), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(35)
                .y_label_area_size(390)
                .build_cartesian_2d(
                    0f64..x_max,
                    (0u32..(rows.len() as u32).saturating_sub(1)).into_segmented(),
                )
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(rows.len())
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) => {
                        labels.get(*i as usize).cloned().unwrap_or_default()
                    }
                    _ => String::new(),
                })
                .x_label_formatter(&|v| format!("{v:.0}"))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(plot_err)?;
            chart
                .draw_series(rows.iter().enumerate().map(|(i, r)| {
                    let i = i as u32;
                    let mut bar = Rectangle::new(
                        [
                            (0.0, SegmentValue::Exact(i)),
                            (value(r), SegmentValue::Exact(i + 1)),
                        ],
                        color_of(r.name).filled(),
                    );
                    bar.set_margin(6, 6, 0, 0);
                    bar
                }))
                .map_err(plot_err)?;
            chart
                .draw_series(rows.iter().enumerate().map(|(i, r)| {
                    Text::new(
                        format!("{:.0}", value(r)),
                        (value(r), SegmentValue::CenterOf(i as u32)),
                        ("sans-serif", 14),
                    )
                }))
                .map_err(plot_err)?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}
