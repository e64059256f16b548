//! The results: one table of medians and spreads, ratios to the direct path and to OpenSSH, the
//! goals checked, JSON for machines, and an SVG of the round-trip latency distributions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::hop::HopResult;
use crate::stats::{Summary, summarize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Header {
    pub date: String,
    pub commit: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub quick: bool,
    pub runs: usize,
    /// The gateway kinds of a partial run (`--only`); empty for a full run.
    #[serde(default)]
    pub only: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub variant: String,
    pub cipher: String,
    pub negotiated: String,
    pub run: usize,
    pub metrics: Metrics,
}

/// One pass's figures by name (`rtt_p50_us`, ...).
pub type Metrics = BTreeMap<String, f64>;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Scale {
    pub variant: String,
    /// (sessions, RSS MiB, PSS MiB, PSS KiB per session) at each N.
    pub points: Vec<(usize, f64, f64, f64)>,
    pub max_sessions: Option<usize>,
    pub max_note: Option<String>,
    pub sessions_per_sec: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub header: Header,
    pub records: Vec<Record>,
    pub rtt_cdf: BTreeMap<String, Vec<(f64, f64)>>,
    /// Gateway residence time distributions (absent in results of older runs).
    #[serde(default)]
    pub residence_cdf: BTreeMap<String, Vec<(f64, f64)>>,
    pub scale: Vec<Scale>,
    pub hop: Vec<HopResult>,
}

/// The MQTT workload's columns (variants `mqtt/...`).
const MQTT_COLUMNS: &[(&str, &str, bool)] = &[
    ("mqtt_q0_p50_us", "QoS0 p50 µs", false),
    ("mqtt_q0_p99_us", "QoS0 p99 µs", false),
    ("mqtt_q1_p50_us", "QoS1 p50 µs", false),
    ("mqtt_q1_p99_us", "QoS1 p99 µs", false),
    ("mqtt_msgs_per_s", "msg/s 16 pubs", true),
];

/// The MQTT variant the gateways are held against: Mosquitto's own mutual TLS.
const MQTT_TLS: &str = "mqtt/tls-mutual";

fn is_mqtt(variant: &str) -> bool {
    variant.starts_with("mqtt/")
}

/// The columns of the main table: metric key, heading, whether higher is better.
const COLUMNS: &[(&str, &str, bool)] = &[
    ("rtt_p50_us", "RTT p50 µs", false),
    ("rtt_p99_us", "p99", false),
    ("rtt_p999_us", "p99.9", false),
    ("rtt_max_us", "max", false),
    ("residence_p50_us", "gw resid. p50 µs", false),
    ("residence_p99_us", "p99", false),
    ("residence_p999_us", "p99.9", false),
    ("cpu_ms_per_10k_msgs", "gw CPU ms/10k msg", false),
    ("user_cpu_ms_per_10k_msgs", "of it user", false),
    ("sleeps_per_msg", "gw sleeps/msg", false),
    ("syscalls_per_msg", "gw syscalls/msg", false),
    ("connect_p50_us", "conn+1B p50 µs", false),
    ("connect_p99_us", "p99", false),
    ("connects_per_s", "conn/s", true),
    ("upload_mbps", "up MB/s", true),
    ("download_mbps", "down MB/s", true),
    ("cpu_s_per_gb", "gw CPU s/GB", false),
    ("fanout_msgs_per_s", "fan-out msg/s", true),
    ("fanout_p50_us", "p50 µs", false),
    ("fanout_p99_us", "p99 µs", false),
];

impl Report {
    pub fn variants(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for r in &self.records {
            if !seen.contains(&r.variant) {
                seen.push(r.variant.clone());
            }
        }
        seen
    }

    pub fn summary(&self, variant: &str, metric: &str) -> Option<Summary> {
        let values: Vec<f64> = self
            .records
            .iter()
            .filter(|r| r.variant == variant)
            .filter_map(|r| r.metrics.get(metric).copied())
            .collect();
        summarize(&values)
    }

    /// The OpenSSH variant to compare `variant` with: same cipher, else the default one.
    fn baseline(&self, variant: &str) -> Option<String> {
        let cipher = variant.split('/').nth(1).unwrap_or("default");
        let all = self.variants();
        [format!("openssh/{cipher}"), "openssh/default".to_string()]
            .into_iter()
            .find(|v| all.contains(v))
    }

    /// `variant` over `base` for `metric`, run by run (the runs interleave the variants, so
    /// run i of both saw the same machine): median and spread of the per-run ratios.
    fn ratio(&self, variant: &str, base: &str, metric: &str) -> Option<Summary> {
        let get = |m: &Metrics| m.get(metric).copied();
        self.ratio_of(variant, &get, base, &get)
    }

    /// `figure` of `variant` over `base_figure` of `base`, run by run, as `ratio`.
    fn ratio_of(
        &self,
        variant: &str,
        figure: &dyn Fn(&Metrics) -> Option<f64>,
        base: &str,
        base_figure: &dyn Fn(&Metrics) -> Option<f64>,
    ) -> Option<Summary> {
        let value = |v: &str, run: usize, figure: &dyn Fn(&Metrics) -> Option<f64>| {
            self.records
                .iter()
                .find(|r| r.variant == v && r.run == run)
                .and_then(|r| figure(&r.metrics))
        };
        let runs: Vec<usize> = self
            .records
            .iter()
            .filter(|r| r.variant == variant)
            .map(|r| r.run)
            .collect();
        let ratios: Vec<f64> = runs
            .into_iter()
            .filter_map(|run| Some((value(variant, run, figure)?, value(base, run, base_figure)?)))
            .filter(|(_, b)| *b > 0.0)
            .map(|(a, b)| a / b)
            .collect();
        summarize(&ratios)
    }

    pub fn table(&self) -> String {
        let h = &self.header;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "cmxsafe benchmark {}  commit {}  kernel {}  CPU {} ({} cores){}\nmedian over {} interleaved runs; ±x% = (max-min)/median\n",
            h.date,
            h.commit,
            h.kernel,
            h.cpu,
            h.cores,
            if h.quick {
                "  QUICK (smoke sizes: not a measurement)"
            } else {
                ""
            },
            h.runs
        );
        if !h.only.is_empty() {
            let _ = writeln!(
                out,
                "partial run: only {} (no idle-session scale, no in-gateway hop)",
                h.only.join(", ")
            );
        }
        if !self.records.is_empty() {
            self.variant_tables(&mut out);
        }
        self.scale_table(&mut out);
        self.hop_table(&mut out);
        if !self.records.is_empty() {
            out.push_str(&self.goals());
        }
        out
    }

    /// Idle sessions: the gateway's memory per session, the most sessions held, handshakes/s.
    fn scale_table(&self, out: &mut String) {
        if self.scale.is_empty() {
            return;
        }
        let _ = writeln!(out, "\nidle sessions: gateway memory (all its processes)");
        for s in &self.scale {
            for (n, rss, pss, per) in &s.points {
                let _ = writeln!(
                    out,
                    "{:<30} N={n:<6} RSS {rss:>8.1} MiB  PSS {pss:>8.1} MiB  PSS/session {per:>8.1} KiB",
                    s.variant
                );
            }
            if let Some(m) = s.max_sessions {
                let _ = writeln!(
                    out,
                    "{:<30} largest N sustained: {m}{}",
                    s.variant,
                    s.max_note
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                );
            }
            if let Some(r) = s.sessions_per_sec {
                let _ = writeln!(
                    out,
                    "{:<30} session establishment: {r:.0} handshakes+auth/s",
                    s.variant
                );
            }
        }
    }

    /// The in-gateway hop alone: sockmap splice against loopback TCP.
    fn hop_table(&self, out: &mut String) {
        if self.hop.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "\nthe in-gateway hop alone (ID-sock -> Mir-sock): sockmap splice vs loopback TCP \
             (\"userspace\"), 64 B RTT with tokio and with blocking endpoints"
        );
        for one_cpu in [true, false] {
            let placement = if one_cpu { "one CPU" } else { "any CPU" };
            for mode in ["sockmap", "userspace"] {
                if !self.hop.iter().any(|h| h.mode == mode && h.one_cpu == one_cpu) {
                    continue;
                }
                let median = |f: &dyn Fn(&HopResult) -> Option<f64>| {
                    self.hop_median(mode, one_cpu, f)
                        .map_or_else(|| "-".to_string(), fmt)
                };
                let _ = writeln!(
                    out,
                    "{placement:<8} {mode:<10} tokio p50 {:>6} µs p99 {:>6} µs | blocking p50 {:>6} µs p99 {:>6} µs | bulk {:>6} MB/s",
                    median(&|h| Some(h.rtt.p50_us)),
                    median(&|h| Some(h.rtt.p99_us)),
                    median(&|h| h.kernel_rtt.as_ref().map(|l| l.p50_us)),
                    median(&|h| h.kernel_rtt.as_ref().map(|l| l.p99_us)),
                    median(&|h| Some(h.bulk_mbps)),
                );
            }
            for (what, r) in [
                ("tokio", self.hop_ratio(one_cpu, |h| Some(h.rtt.p50_us))),
                (
                    "blocking",
                    self.hop_ratio(one_cpu, |h| h.kernel_rtt.as_ref().map(|l| l.p50_us)),
                ),
            ] {
                if let Some(r) = r {
                    let verdict = if r <= 0.70 { "met" } else { "NOT met" };
                    let _ = writeln!(
                        out,
                        "{placement:<8} sockmap p50 / loopback TCP p50, {what} endpoints: {r:.2} (goal <= 0.70: {verdict})"
                    );
                }
            }
        }
    }

    /// Per-variant medians with spreads, then ratios to OpenSSH and to the direct path.
    fn variant_tables(&self, out: &mut String) {
        let echo: Vec<String> = self.variants().into_iter().filter(|v| !is_mqtt(v)).collect();
        let _ = writeln!(out, "{:<30} {:<26}", "", "cipher negotiated");
        self.columns_table(out, &echo, COLUMNS, |v| {
            if v == "direct" || v.starts_with("openssh") {
                return Vec::new();
            }
            // A before/after run (`CMX_BENCH_BASELINE_GATEWAY`): this build over the other.
            let before = v
                .strip_prefix("cmx-sockmap/")
                .map(|cipher| format!("cmx-baseline/{cipher}"))
                .filter(|b| echo.contains(b));
            [
                (self.baseline(v), "÷ openssh"),
                (Some("direct".to_string()), "÷ direct"),
                (before, "÷ baseline build"),
            ]
            .into_iter()
            // A partial run (`--only`) may lack a base.
            .filter_map(|(b, l)| Some((b.filter(|b| echo.contains(b))?, l)))
            .collect()
        });
        let mqtt: Vec<String> = self.variants().into_iter().filter(|v| is_mqtt(v)).collect();
        if !mqtt.is_empty() {
            let _ = writeln!(
                out,
                "\nMQTT: a Mosquitto broker on the server host, publisher and subscriber on the device host; publish-to-delivery latency, one message at a time, and QoS 1 messages/s from 16 publishers"
            );
            self.columns_table(out, &mqtt, MQTT_COLUMNS, |v| {
                if v == MQTT_TLS || v == "mqtt/plain" {
                    return Vec::new();
                }
                vec![
                    (MQTT_TLS.to_string(), "÷ mosquitto TLS"),
                    ("mqtt/plain".to_string(), "÷ plain"),
                ]
            });
        }
    }

    /// One table: `variants` with `columns` (median ± spread), then each variant's per-run
    /// ratios to the baselines `bases` names for it.
    fn columns_table(
        &self,
        out: &mut String,
        variants: &[String],
        columns: &[(&str, &str, bool)],
        bases: impl Fn(&str) -> Vec<(String, &'static str)>,
    ) {
        let _ = write!(out, "{:<30} {:<26}", "variant", "");
        for (_, head, _) in columns {
            let _ = write!(out, " {head:>16}");
        }
        out.push('\n');
        let negotiated: BTreeMap<&str, &str> = self
            .records
            .iter()
            .map(|r| (r.variant.as_str(), r.negotiated.as_str()))
            .collect();
        for v in variants {
            let _ = write!(
                out,
                "{:<30} {:<26}",
                v,
                negotiated.get(v.as_str()).copied().unwrap_or("?")
            );
            for (key, _, _) in columns {
                let cell = match self.summary(v, key) {
                    Some(s) if s.median > 0.0 => {
                        let spread = (s.max - s.min) / s.median * 100.0;
                        format!("{} ±{spread:.0}%", fmt(s.median))
                    }
                    _ => "-".into(),
                };
                let _ = write!(out, " {cell:>16}");
            }
            out.push('\n');
        }

        let _ = writeln!(out, "\nratios run by run (median, then min-max over the runs)");
        let _ = write!(out, "{:<30}", "variant");
        for (_, head, _) in columns {
            let _ = write!(out, " {head:>16}");
        }
        out.push('\n');
        for v in variants {
            for (base, label) in bases(v) {
                let _ = write!(out, "{:<30}", format!("{v} {label}"));
                for (key, _, _) in columns {
                    let cell = self
                        .ratio(v, &base, key)
                        .map(|r| format!("{:.2}× {:.2}-{:.2}", r.median, r.min, r.max))
                        .unwrap_or_else(|| "-".into());
                    let _ = write!(out, " {cell:>16}");
                }
                out.push('\n');
            }
        }
    }

    /// The median over runs of one figure of the `mode` hop at one CPU placement.
    fn hop_median(
        &self,
        mode: &str,
        one_cpu: bool,
        figure: impl Fn(&HopResult) -> Option<f64>,
    ) -> Option<f64> {
        let values: Vec<f64> = self
            .hop
            .iter()
            .filter(|h| h.mode == mode && h.one_cpu == one_cpu)
            .filter_map(figure)
            .collect();
        summarize(&values).map(|s| s.median)
    }

    /// The sockmap hop's p50 over the loopback one (medians over runs), at one CPU placement.
    fn hop_ratio(&self, one_cpu: bool, p50: impl Fn(&HopResult) -> Option<f64>) -> Option<f64> {
        Some(self.hop_median("sockmap", one_cpu, &p50)? / self.hop_median("userspace", one_cpu, &p50)?)
    }

    fn goals(&self) -> String {
        let mut out = String::from(
            "\ngoals (cmx-sockmap with stock ssh agents vs OpenSSH, same cipher, this run; met only when every run meets it):\n",
        );
        let v = self.variants().into_iter().find(|v| v.starts_with("cmx-sockmap"));
        let Some(v) = v else { return out };
        let Some(base) = self.baseline(&v) else { return out };
        let mut line = |goal: &str, value: Option<Summary>, ok: fn(f64) -> bool, unit: &str| {
            goal_line(&mut out, goal, value, ok, unit)
        };
        let ms = |s: Summary| Summary {
            median: s.median / 1000.0,
            min: s.min / 1000.0,
            max: s.max / 1000.0,
            runs: s.runs,
        };
        line(
            "64 B RTT p50 <= 0.5x OpenSSH",
            self.ratio(&v, &base, "rtt_p50_us"),
            |x| x <= 0.5,
            "x",
        );
        line(
            "gateway residence p50 <= 0.5x OpenSSH",
            self.ratio(&v, &base, "residence_p50_us"),
            |x| x <= 0.5,
            "x",
        );
        line(
            "gateway residence p99.9 <= 0.25x OpenSSH",
            self.ratio(&v, &base, "residence_p999_us"),
            |x| x <= 0.25,
            "x",
        );
        line(
            "gateway CPU per 10,000 64 B msgs <= 0.5x OpenSSH",
            self.ratio(&v, &base, "cpu_ms_per_10k_msgs"),
            |x| x <= 0.5,
            "x",
        );
        line(
            "64 B RTT p99.9 <= 2 ms",
            self.summary(&v, "rtt_p999_us").map(ms),
            |x| x <= 2.0,
            " ms",
        );
        line(
            "connection + first byte p50 <= 1 ms",
            self.summary(&v, "connect_p50_us").map(ms),
            |x| x <= 1.0,
            " ms",
        );
        // The worse direction of each run.
        let bulk = match (
            self.ratio(&v, &base, "upload_mbps"),
            self.ratio(&v, &base, "download_mbps"),
        ) {
            (Some(a), Some(b)) => Some(Summary {
                median: a.median.min(b.median),
                min: a.min.min(b.min),
                max: a.max.min(b.max),
                runs: a.runs.min(b.runs),
            }),
            _ => None,
        };
        line("bulk >= 2x OpenSSH (worse direction)", bulk, |x| x >= 2.0, "x");
        line(
            "gateway CPU per GB <= 0.5x OpenSSH",
            self.ratio(&v, &base, "cpu_s_per_gb"),
            |x| x <= 0.5,
            "x",
        );
        line(
            "fan-out msgs/s >= 2x OpenSSH",
            self.ratio(&v, &base, "fanout_msgs_per_s"),
            |x| x >= 2.0,
            "x",
        );
        let single = |x: f64| Summary {
            median: x,
            min: x,
            max: x,
            runs: 1,
        };
        let per_session = self
            .scale
            .iter()
            .find(|s| s.variant.starts_with("cmx"))
            .and_then(|s| s.points.last())
            .map(|p| single(p.3 / 1024.0));
        line(
            "memory per idle session <= 0.1 MB PSS",
            per_session,
            |x| x <= 0.1,
            " MiB",
        );
        let max = self
            .scale
            .iter()
            .find(|s| s.variant.starts_with("cmx"))
            .and_then(|s| s.max_sessions)
            .map(|m| single(m as f64));
        line("10,000 sessions sustained", max, |x| x >= 10_000.0, "");
        out.push_str(&self.fanout_ceiling(&v, &base));

        out.push_str(&self.alternative_goals(&v));
        out
    }

    /// How far fan-out could go on this machine at all. The agents, the apps and the load
    /// generator share the CPUs with the gateway; with a gateway that cost nothing and every CPU
    /// busy, `v`'s rate would grow by all / (busy - gateway) and no further. That rate over
    /// `base`'s, run by run, is the most any gateway could reach here.
    fn fanout_ceiling(&self, v: &str, base: &str) -> String {
        let free_gateway = |m: &Metrics| {
            let rate = m.get("fanout_msgs_per_s")?;
            let busy = m.get("fanout_machine_busy")?;
            let share = m.get("fanout_gw_share")?;
            let rest = busy * (1.0 - share);
            (rest > 0.0).then(|| rate / rest)
        };
        let rate = |m: &Metrics| m.get("fanout_msgs_per_s").copied();
        let (Some(x), Some(busy), Some(share)) = (
            self.ratio_of(v, &free_gateway, base, &rate),
            self.summary(v, "fanout_machine_busy"),
            self.summary(v, "fanout_gw_share"),
        ) else {
            return String::new();
        };
        format!(
            "  fan-out ceiling on this machine: a gateway costing no CPU, every CPU busy: {}x ({}-{}) {base}'s rate\n    ({v}: the machine {:.0} % busy, its gateway {:.0} % of that; the rest is the agents, the apps and the load generator)\n",
            fmt(x.median),
            fmt(x.min),
            fmt(x.max),
            busy.median * 100.0,
            share.median * 100.0,
        )
    }

    /// Issue 15's goals against what users pick instead (stunnel, WireGuard, Mosquitto's TLS):
    /// `v` over each, run by run.
    fn alternative_goals(&self, v: &str) -> String {
        let mut out =
            format!("\ngoals against the alternatives ({v} over each; met only when every run meets it):\n");
        let all = self.variants();
        for alt in all
            .iter()
            .filter(|a| a.starts_with("stunnel") || a.starts_with("wireguard"))
        {
            let mut goals: Vec<(String, &str, Met)> = vec![
                (
                    format!("connection + first byte p50 <= {alt}'s"),
                    "connect_p50_us",
                    |x| x <= 1.0,
                ),
                (format!("64 B RTT p99.9 <= {alt}'s"), "rtt_p999_us", |x| x <= 1.0),
            ];
            if alt.starts_with("wireguard") {
                goals.push((
                    format!("gateway CPU per GB <= 1.5x {alt}'s"),
                    "cpu_s_per_gb",
                    |x| x <= 1.5,
                ));
            }
            for (goal, metric, ok) in goals {
                goal_line(&mut out, &goal, self.ratio(v, alt, metric), ok, "x");
            }
        }
        if all.iter().any(|a| a == MQTT_TLS) {
            let cmx = "mqtt/cmx-sockmap";
            let _ = writeln!(
                out,
                "\ngoals for MQTT ({cmx} over {MQTT_TLS}, the CMXsafe paper's margins; met only when every run meets it):"
            );
            let goals: [(&str, &str, Met); 3] = [
                ("QoS 0 publish-to-delivery p50 <= 0.75x", "mqtt_q0_p50_us", |x| {
                    x <= 0.75
                }),
                ("QoS 1 publish-to-delivery p50 <= 0.75x", "mqtt_q1_p50_us", |x| {
                    x <= 0.75
                }),
                ("messages/s, 16 publishers >= 1.22x", "mqtt_msgs_per_s", |x| {
                    x >= 1.22
                }),
            ];
            for (goal, metric, ok) in goals {
                goal_line(&mut out, goal, self.ratio(cmx, MQTT_TLS, metric), ok, "x");
            }
        }
        out
    }

    /// Every variant produced every workload's numbers (what the CI smoke run checks).
    pub fn complete(&self) -> Result<(), String> {
        for v in self.variants() {
            let columns = if is_mqtt(&v) { MQTT_COLUMNS } else { COLUMNS };
            for (key, _, _) in columns {
                if v == "direct"
                    && matches!(
                        *key,
                        "cpu_s_per_gb"
                            | "cpu_ms_per_10k_msgs"
                            | "user_cpu_ms_per_10k_msgs"
                            | "sleeps_per_msg"
                            | "syscalls_per_msg"
                    )
                {
                    continue;
                }
                if self.summary(&v, key).is_none() {
                    return Err(format!("{v}: no value for {key}"));
                }
            }
        }
        // A partial run (`--only`) measures no hop.
        let modes: &[&str] = if self.header.only.is_empty() {
            &["sockmap", "userspace"]
        } else {
            &[]
        };
        for &mode in modes {
            for one_cpu in [true, false] {
                let measured = self.hop.iter().any(|h| {
                    h.mode == mode && h.one_cpu == one_cpu && h.rtt.count > 0 && h.kernel_rtt.is_some()
                });
                if !measured {
                    return Err(format!("hop {mode} (one_cpu: {one_cpu}): no RTT measured"));
                }
            }
        }
        Ok(())
    }

    pub fn svg(&self) -> String {
        self.cdf_svg("64 B round-trip latency, cumulative distribution", &self.rtt_cdf)
    }

    /// The gateway residence time distributions (one 64 B message, arrival to departure), for
    /// the default cipher and the variants without one (the full set is in the JSON): fifteen
    /// lines would not be readable.
    pub fn residence_svg(&self) -> String {
        let shown: BTreeMap<String, Vec<(f64, f64)>> = self
            .residence_cdf
            .iter()
            .filter(|(v, _)| {
                !v.contains('/')
                    || v.ends_with("/default")
                    || v.starts_with("stunnel")
                    || v.starts_with("wireguard")
            })
            .map(|(v, cdf)| (v.clone(), cdf.clone()))
            .collect();
        self.cdf_svg(
            "gateway residence time of a 64 B message (in to out at its interfaces; default cipher), cumulative distribution",
            &shown,
        )
    }

    fn cdf_svg(&self, title: &str, cdfs: &BTreeMap<String, Vec<(f64, f64)>>) -> String {
        let (w, h, left, bottom) = (900.0, 520.0, 70.0, 60.0);
        let max_us = cdfs.values().flatten().map(|p| p.1).fold(10.0_f64, f64::max);
        let (lo, hi) = (1.0_f64.log10(), max_us.log10().ceil());
        let x = |us: f64| left + (us.max(1.0).log10() - lo) / (hi - lo) * (w - left - 20.0);
        // Tail-friendly y axis: 0, 90, 99, 99.9, 99.99 % equally spaced (-log10 of the rest).
        let tail = |pct: f64| (-(1.0 - pct / 100.0).max(1e-4).log10()).min(4.0);
        let y = |pct: f64| (h - bottom) - tail(pct) / 4.0 * (h - bottom - 20.0);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        );
        let _ = writeln!(
            s,
            "<text x=\"{left}\" y=\"14\">{title} ({})</text>",
            self.header.date
        );
        for d in 0..=(hi as i32) {
            let us = 10f64.powi(d);
            let _ = writeln!(
                s,
                "<line x1=\"{0}\" y1=\"20\" x2=\"{0}\" y2=\"{1}\" stroke=\"#ddd\"/><text x=\"{0}\" y=\"{2}\" text-anchor=\"middle\">{3}</text>",
                x(us),
                h - bottom,
                h - bottom + 16.0,
                fmt(us)
            );
        }
        for pct in [0.0, 50.0, 90.0, 99.0, 99.9, 99.99] {
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#eee\"/><text x=\"{2}\" y=\"{0}\" text-anchor=\"end\">{pct}%</text>",
                y(pct),
                w - 20.0,
                left - 6.0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">microseconds (log scale)</text>",
            (w + left) / 2.0,
            h - 20.0
        );
        let colors = [
            "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
            "#1f78b4", "#b2df8a", "#fb9a99",
        ];
        for (i, (variant, cdf)) in cdfs.iter().enumerate() {
            let color = colors[i % colors.len()];
            let points: Vec<String> = cdf
                .iter()
                .map(|(pct, us)| format!("{:.1},{:.1}", x(*us), y(*pct)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                points.join(" ")
            );
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{variant}</text>",
                left + 10.0,
                34.0 + 15.0 * i as f64
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// results.json, table.txt and rtt.svg in `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        self.write_renderings(dir)
    }

    /// table.txt and rtt.svg only: `render` must not rewrite the measurements it reads.
    pub fn write_renderings(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("table.txt"), self.table())?;
        std::fs::write(dir.join("residence.svg"), self.residence_svg())?;
        std::fs::write(dir.join("rtt.svg"), self.svg())
    }
}

/// A goal is met when the whole spread meets it: the best and the worst run alike. A spread
/// that straddles the goal is not a verdict either way (machines are noisy; rerun or look at the
/// runs).
fn verdict(s: &Summary, ok: fn(f64) -> bool) -> &'static str {
    match (ok(s.min), ok(s.max)) {
        (true, true) => "met",
        (false, false) => "NOT met",
        _ => "NOT met (the spread straddles the goal)",
    }
}

/// Whether a figure meets a goal.
type Met = fn(f64) -> bool;

/// One goal's line: the figure with its spread over the runs, and the verdict.
fn goal_line(out: &mut String, goal: &str, value: Option<Summary>, ok: fn(f64) -> bool, unit: &str) {
    let (shown, verdict) = match value {
        Some(s) => (
            format!("{}{unit} ({}-{})", fmt(s.median), fmt(s.min), fmt(s.max)),
            verdict(&s, ok),
        ),
        None => ("-".into(), "not measured"),
    };
    let _ = writeln!(out, "  {goal:<56} {shown:>24}  {verdict}");
}

fn fmt(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(pairs: &[(f64, f64)]) -> Report {
        let mut records = Vec::new();
        for (run, (cmx, openssh)) in pairs.iter().enumerate() {
            for (variant, p50) in [("cmx-sockmap/default", cmx), ("openssh/default", openssh)] {
                records.push(Record {
                    variant: variant.into(),
                    cipher: "default".into(),
                    negotiated: "chacha20-poly1305@openssh.com".into(),
                    run,
                    metrics: BTreeMap::from([("rtt_p50_us".to_string(), *p50)]),
                });
            }
        }
        Report {
            header: Header {
                date: "2026-11-30".into(),
                commit: "test".into(),
                kernel: "test".into(),
                cpu: "test".into(),
                cores: 2,
                quick: false,
                runs: pairs.len(),
                only: vec![],
            },
            records,
            rtt_cdf: BTreeMap::new(),
            residence_cdf: BTreeMap::new(),
            scale: vec![],
            hop: vec![],
        }
    }

    fn rtt_goal(r: &Report) -> String {
        r.goals()
            .lines()
            .find(|l| l.contains("64 B RTT p50"))
            .unwrap()
            .to_string()
    }

    /// Ratios are taken run by run (the runs interleave), and their spread is shown.
    #[test]
    fn ratios_pair_the_runs_and_show_their_spread() {
        let r = report(&[(40.0, 100.0), (60.0, 100.0), (45.0, 90.0)]);
        let s = r
            .ratio("cmx-sockmap/default", "openssh/default", "rtt_p50_us")
            .unwrap();
        assert_eq!((s.min, s.median, s.max, s.runs), (0.4, 0.5, 0.6, 3));
    }

    /// A goal is met only when every run meets it; a spread across the goal is not a pass.
    #[test]
    fn a_goal_is_met_only_when_the_whole_spread_meets_it() {
        let all = report(&[
            (40.0, 100.0),
            (45.0, 100.0),
            (48.0, 100.0),
            (42.0, 100.0),
            (44.0, 100.0),
        ]);
        assert!(rtt_goal(&all).ends_with("  met"), "{}", rtt_goal(&all));
        let straddles = report(&[
            (40.0, 100.0),
            (45.0, 100.0),
            (48.0, 100.0),
            (42.0, 100.0),
            (55.0, 100.0),
        ]);
        // The median (0.45) meets the goal; one run does not.
        assert!(
            rtt_goal(&straddles).ends_with("NOT met (the spread straddles the goal)"),
            "{}",
            rtt_goal(&straddles)
        );
        let none = report(&[(60.0, 100.0), (70.0, 100.0), (65.0, 100.0)]);
        assert!(rtt_goal(&none).ends_with("  NOT met"), "{}", rtt_goal(&none));
    }

    /// The fan-out ceiling: the variant's rate if the rest of the machine (its CPU per message
    /// without the gateway's) had every CPU, over the base's rate, run by run.
    #[test]
    fn the_fanout_ceiling_is_the_rate_the_rest_of_the_machine_allows_over_the_base() {
        let mut r = report(&[(40.0, 100.0), (45.0, 100.0), (42.0, 100.0)]);
        // cmx: 8000 msg/s with the machine 80 % busy, its gateway half of that: the rest alone
        // at 100 % would do 8000 / 0.4 = 20000, 2.5x OpenSSH's 8000; 4x and 2x in the others.
        let runs = [(8000.0, 0.8, 0.5), (8000.0, 0.5, 0.5), (5000.0, 1.0, 0.5)];
        for (i, rec) in r.records.iter_mut().enumerate() {
            let (rate, busy, share) = if rec.variant.starts_with("openssh") {
                (5000.0 + 3000.0 * f64::from(i < 4), 0.7, 0.4)
            } else {
                runs[i / 2]
            };
            rec.metrics.insert("fanout_msgs_per_s".into(), rate);
            rec.metrics.insert("fanout_machine_busy".into(), busy);
            rec.metrics.insert("fanout_gw_share".into(), share);
        }
        let goals = r.goals();
        let ceiling = goals.lines().find(|l| l.contains("ceiling")).unwrap();
        assert!(
            ceiling.contains("2.50x (2.00-4.00) openssh/default's rate"),
            "{ceiling}"
        );
        assert!(
            goals.contains("(cmx-sockmap/default: the machine 80 % busy, its gateway 50 % of that;"),
            "{goals}"
        );
    }
}
