//! Compliance exports end to end: a real agent (fake sysfs, real uevents in a private
//! namespace) and a real collector produce events and alerts; `weilan collector
//! export` writes them in both languages; every count is checked against the
//! database; headless Chromium renders each report with its charts; `verify-export`
//! passes on the chain and fails, naming the file, once a byte changes.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use weilan_agent::source::usb::sysfs::fake::{add_stick, FakeStick};

const T: Duration = Duration::from_secs(60);

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|p| have(p))
}

/// Renders `html` headless to a PNG and returns the pixels as RGBA.
fn screenshot(browser: &str, html: &Path, png: &Path) -> (u32, u32, Vec<u8>) {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1000,1600",
        ])
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(
        png.exists(),
        "no screenshot from {browser}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let rgba: Vec<u8> = match info.color_type {
        png::ColorType::Rgba => buf[..info.buffer_size()].to_vec(),
        png::ColorType::Rgb => buf[..info.buffer_size()]
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    (info.width, info.height, rgba)
}

/// Pixels of exactly this colour.
fn pixels(rgba: &[u8], hex: &str) -> usize {
    let c = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap();
    let (r, g, b) = ((c >> 16) as u8, (c >> 8) as u8, c as u8);
    rgba.chunks(4)
        .filter(|p| p[0] == r && p[1] == g && p[2] == b)
        .count()
}

fn csv_rows(path: &Path) -> usize {
    let bytes = fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\xEF\xBB\xBF"),
        "{}: BOM",
        path.display()
    );
    String::from_utf8(bytes[3..].to_vec())
        .unwrap()
        .lines()
        .count()
        - 1
}

fn weilan(args: &[&str]) -> std::process::Output {
    Command::new(weilan_bin()).args(args).output().unwrap()
}

#[test]
fn exports_count_render_in_chromium_and_verify() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    fs::write(
        w.path("policy.toml"),
        "version = \"exp-1\"\n[usb]\nmode = \"enforce\"\ndefault_target = \"block\"\n\
         [[usb.known_devices]]\nlabel = \"issued\"\nserial = \"EXP-OK\"\n\
         [[usb.rules]]\nid = \"issued\"\ntarget = \"allow\"\nserial = [\"EXP-OK\"]\n",
    )
    .unwrap();
    let sys = w.sysfs();
    for (port, serial) in [("1-1", "EXP-OK"), ("1-2", "EXP-UNKNOWN-1")] {
        add_stick(
            &sys,
            &FakeStick {
                port,
                vid: "0951",
                pid: "1666",
                serial,
                classes: &[8],
                disk: None,
            },
        );
    }
    let from = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60);
    let ns = Netns::create();
    let cfg = w.collector_toml(false, "[exports]\ndir = \"exports\"\n");
    fs::create_dir_all(w.path("exports")).unwrap();
    let collector = w.start_collector(&ns, &cfg);
    // Heartbeats every second: the export must leave some out of events.csv.
    let agent_cfg = w.agent_toml(AGENT, "pki/ca.pem", "[heartbeat]\ninterval_secs = 1\n");
    let agent = w.start_agent(&ns, &agent_cfg, AGENT);
    let diag = || format!("{}\n{}", collector.log_text(), agent.log_text());
    let late = add_stick(
        &sys,
        &FakeStick {
            port: "1-3",
            vid: "0951",
            pid: "1666",
            serial: "EXP-UNKNOWN-2",
            classes: &[8],
            disk: None,
        },
    );
    wait_for(
        "agent up",
        T,
        || (w.count("SELECT COUNT(*) FROM events WHERE kind = 'usb.decision'") >= 2).then_some(()),
        diag,
    );
    ns.send_uevent("add", &late, "usb", "usb_device");
    wait_for(
        "three decisions and a red alert each for the unknown sticks",
        T,
        || {
            let decisions = w.count("SELECT COUNT(*) FROM events WHERE kind = 'usb.decision'");
            let red = w.count("SELECT COUNT(*) FROM alerts WHERE level = 'red'");
            (decisions >= 3 && red >= 2).then_some(())
        },
        diag,
    );
    wait_for(
        "heartbeats stored",
        T,
        || {
            (w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.heartbeat'") >= 2)
                .then_some(())
        },
        diag,
    );
    let to = jiff::Timestamp::now();
    let (from_s, to_s) = (from.to_string(), to.to_string());
    let db_events = w.count(&format!(
        "SELECT COUNT(*) FROM events WHERE received_at >= '{from_s}' AND received_at < '{to_s}'"
    ));
    // Heartbeats are in events.jsonl and counted, not rows of events.csv.
    let db_heartbeats = w.count(&format!(
        "SELECT COUNT(*) FROM events WHERE received_at >= '{from_s}' AND received_at < '{to_s}' AND kind = 'agent.heartbeat'"
    ));
    let db_alerts = |level: &str| {
        w.count(&format!(
            "SELECT COUNT(*) FROM alerts WHERE time >= '{from_s}' AND time < '{to_s}' AND level LIKE '{level}'"
        ))
    };
    // `weilan collector export` of the window into `out`, with `more` arguments.
    let export = |out: &Path, more: &[&str]| {
        let mut args = vec![
            "collector",
            "export",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            &from_s,
            "--to",
            &to_s,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(more);
        let o = weilan(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let browser = chromium();
    for (lang, label_red) in [("zh-CN", "红"), ("en", "Red")] {
        let out_dir = w.path(&format!("exports/{lang}"));
        export(&out_dir, &["--lang", lang]);
        assert_eq!(
            csv_rows(&out_dir.join("events.csv")) as i64,
            db_events - db_heartbeats
        );
        let manifest: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out_dir.join("manifest.json")).unwrap())
                .unwrap();
        assert!(db_heartbeats >= 2);
        assert_eq!(manifest["counts"]["heartbeats"], db_heartbeats);
        assert_eq!(
            fs::read_to_string(out_dir.join("events.jsonl"))
                .unwrap()
                .lines()
                .count() as i64,
            db_events
        );
        assert_eq!(csv_rows(&out_dir.join("alerts.csv")) as i64, db_alerts("%"));
        let html = fs::read_to_string(out_dir.join("report.html")).unwrap();
        assert!(
            html.contains(&format!("{label_red} {}</span>", db_alerts("red"))),
            "{lang}: red count"
        );
        assert!(html.contains("EXP-UNKNOWN-2") && html.contains("<td>exp-1</td>"));
        // Headless Chromium renders the page with its charts: the bars' colours are on screen.
        if require(
            "the HTML report's rendering check needs Chromium (apt-get install chromium)",
            browser.is_some(),
        ) {
            let png = w.path(&format!("report-{lang}.png"));
            let (width, height, rgba) =
                screenshot(browser.unwrap(), &out_dir.join("report.html"), &png);
            assert_eq!((width, height), (1000, 1600));
            let bars = pixels(&rgba, "#c62828");
            assert!(
                bars > 200,
                "{lang}: the red bars of the day chart are drawn ({bars} px)"
            );
            assert!(
                pixels(&rgba, "#546e7a") > 200,
                "{lang}: the top-N bars are drawn"
            );
            println!("{lang}: rendered {width}×{height}, {bars} px of red bars");
            // For a person to look at (CI can keep them as artifacts).
            if let Ok(keep) = std::env::var("WEILAN_KEEP_SCREENSHOTS") {
                fs::create_dir_all(&keep).unwrap();
                fs::copy(&png, Path::new(&keep).join(format!("report-{lang}.png"))).unwrap();
            }
        }
    }
    // The two exports form a chain; verification passes, then fails on one changed byte.
    let newest = w.path("exports/en");
    let verify_export = || {
        weilan(&[
            "collector",
            "verify-export",
            newest.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
    };
    let o = verify_export();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("ok: 2 export(s), 10 files"),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report = w.path("exports/zh-CN/report.html");
    let mut bytes = fs::read(&report).unwrap();
    let i = bytes.len() / 3;
    bytes[i] ^= 0x20;
    fs::write(&report, bytes).unwrap();
    let o = verify_export();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("zh-CN/report.html") && err.contains("content changed"),
        "{err}"
    );
    // `--heartbeats-in-csv` (docs/exports.md): every event gets its row.
    let all_dir = w.path("exports/with-heartbeats");
    export(&all_dir, &["--heartbeats-in-csv"]);
    assert_eq!(csv_rows(&all_dir.join("events.csv")) as i64, db_events);
    println!("exports: {db_events} events and {} alerts in both languages; chain verified; a changed byte named: {}", db_alerts("%"), err.trim());

    // Heartbeat compaction (docs/exports.md): restarted with compaction after 1 s, the
    // collector compacts at start; the window's heartbeats (the agent's own bytes)
    // leave the events table, and the same export is the same bytes.
    let mut collector = collector;
    collector.stop();
    w.collector_toml(
        false,
        "[exports]\ndir = \"exports\"\nheartbeats_compact_after_secs = 1\n",
    );
    let collector = w.start_collector(&ns, &cfg);
    let in_window = format!("received_at >= '{from_s}' AND received_at < '{to_s}'");
    wait_for(
        "the window's heartbeats compacted",
        T,
        || {
            let rows = w.count(&format!(
                "SELECT COUNT(*) FROM events WHERE kind = 'agent.heartbeat' AND {in_window}"
            ));
            let compacted = w.count("SELECT COALESCE(SUM(count), 0) FROM heartbeat_blocks");
            (rows == 0 && compacted >= db_heartbeats).then_some(())
        },
        || format!("{}\n{}", collector.log_text(), agent.log_text()),
    );
    let again = w.path("exports/compacted");
    export(&again, &["--lang", "zh-CN"]);
    for file in ["events.jsonl", "events.csv"] {
        assert!(
            fs::read(again.join(file)).unwrap()
                == fs::read(w.path("exports/zh-CN").join(file)).unwrap(),
            "{file}: not the same bytes once the heartbeats were compacted"
        );
    }
    println!(
        "compaction: {db_heartbeats} heartbeats of the window compacted; events.jsonl and events.csv unchanged"
    );
}
