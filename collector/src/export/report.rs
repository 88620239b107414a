//! `report.html`: one self-contained page (inline CSS and SVG, no external assets) in
//! zh-CN or en, rendered with askama (escaping every value). Charts are computed
//! here as rectangles and labels; the template only places them.

use askama::Template;

/// Report language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Zh,
    En,
}

impl Lang {
    pub fn parse(s: &str) -> Option<Lang> {
        match s {
            "zh-CN" | "zh" => Some(Lang::Zh),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Lang::Zh => "zh-CN",
            Lang::En => "en",
        }
    }

    pub fn texts(self) -> &'static Texts {
        match self {
            Lang::Zh => &ZH,
            Lang::En => &EN,
        }
    }
}

/// Every label of the page in one language.
pub struct Texts {
    pub title: &'static str,
    pub period: &'static str,
    pub scope: &'static str,
    pub all_agents: &'static str,
    pub generated: &'static str,
    pub counts: &'static str,
    pub events_word: &'static str,
    pub alerts_word: &'static str,
    pub totals: &'static str,
    pub red: &'static str,
    pub yellow: &'static str,
    pub blue: &'static str,
    pub chart_days: &'static str,
    pub top_agents: &'static str,
    pub top_users: &'static str,
    pub top_devices: &'static str,
    pub fleet: &'static str,
    pub expected: &'static str,
    pub reporting: &'static str,
    pub not_reporting: &'static str,
    pub silent_periods: &'static str,
    pub policies: &'static str,
    pub version: &'static str,
    pub agents: &'static str,
    pub usb: &'static str,
    pub decision: &'static str,
    pub device: &'static str,
    pub agent: &'static str,
    pub rule: &'static str,
    pub times: &'static str,
    pub files: &'static str,
    pub files_note: &'static str,
    pub time: &'static str,
    pub user: &'static str,
    pub path: &'static str,
    pub classification: &'static str,
    pub action: &'static str,
    pub transfers: &'static str,
    pub transfers_note: &'static str,
    pub process: &'static str,
    pub destination: &'static str,
    pub bytes: &'static str,
    pub unlocks: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub failures: &'static str,
    pub integrity: &'static str,
    pub summary: &'static str,
    pub mapping: &'static str,
    pub mapping_note: &'static str,
    pub control: &'static str,
    pub sections: &'static str,
    pub indicators: &'static str,
    pub footer: &'static str,
}

pub static ZH: Texts = Texts {
    title: "围栏 Weilan 合规审计报告",
    period: "审计期间",
    scope: "范围",
    all_agents: "全部终端",
    generated: "生成时间",
    counts: "记录数",
    events_word: "条事件",
    alerts_word: "条告警",
    totals: "告警总数（按级别）",
    red: "红",
    yellow: "黄",
    blue: "蓝",
    chart_days: "每日告警（按级别）",
    top_agents: "告警最多的终端",
    top_users: "最活跃的用户（外发文件、传输、登录）",
    top_devices: "最常接入的 USB 设备",
    fleet: "终端覆盖",
    expected: "应报告终端",
    reporting: "已报告终端",
    not_reporting: "本期无事件的终端",
    silent_periods: "终端失联时段：",
    policies: "生效的策略版本",
    version: "版本",
    agents: "终端",
    usb: "USB 设备：阻断与放行",
    decision: "决定",
    device: "设备",
    agent: "终端",
    rule: "规则",
    times: "次数",
    files: "外发的涉密分类文件",
    files_note: "个含分类结果的外发文件（下表最多列 500 个，完整列表见 events.csv）",
    time: "时间",
    user: "用户",
    path: "路径",
    classification: "分类结果",
    action: "处置",
    transfers: "超过阈值的外发网络传输",
    transfers_note: "次传输（下表最多列 500 次）",
    process: "进程",
    destination: "目的地址",
    bytes: "发送字节",
    unlocks: "临时解锁：签发与使用",
    status: "状态",
    reason: "原因",
    failures: "执行失败",
    integrity: "日志缺口与篡改告警",
    summary: "摘要",
    mapping: "控制项对应关系",
    mapping_note: "各表格及内置指标所支撑的等保2.0（GB/T 22239-2019）安全审计要求与 NIST SP 800-53 控制项。",
    control: "控制项",
    sections: "报告章节",
    indicators: "内置指标与规则",
    footer: "本报告及 events.csv、alerts.csv、*.jsonl 的 SHA-256 记录在 manifest.json 中，并由采集端证书签名（manifest.sig），与上一期导出构成哈希链；可用 weilan-collector verify-export 校验。",
};

pub static EN: Texts = Texts {
    title: "Weilan compliance audit report",
    period: "Period",
    scope: "Scope",
    all_agents: "all agents",
    generated: "Generated",
    counts: "Records",
    events_word: "events",
    alerts_word: "alerts",
    totals: "Alerts by level",
    red: "Red",
    yellow: "Yellow",
    blue: "Blue",
    chart_days: "Alerts per day by level",
    top_agents: "Agents with the most alerts",
    top_users: "Most active users (exports, transfers, logins)",
    top_devices: "USB devices plugged most often",
    fleet: "Fleet coverage",
    expected: "Agents expected",
    reporting: "Agents reporting",
    not_reporting: "Agents with no event in the period",
    silent_periods: "Silent periods:",
    policies: "Policy versions in force",
    version: "Version",
    agents: "Agents",
    usb: "USB devices blocked and allowed",
    decision: "Decision",
    device: "Device",
    agent: "Agent",
    rule: "Rule",
    times: "Times",
    files: "Files exported with a classification",
    files_note: "classified files exported (up to 500 listed; all are in events.csv)",
    time: "Time",
    user: "User",
    path: "Path",
    classification: "Classification",
    action: "Action",
    transfers: "Outbound transfers above threshold",
    transfers_note: "transfers (up to 500 listed)",
    process: "Process",
    destination: "Destination",
    bytes: "Bytes sent",
    unlocks: "Temporary unlocks granted and used",
    status: "Status",
    reason: "Reason",
    failures: "Enforcement failures",
    integrity: "Journal gaps and tamper alerts",
    summary: "Summary",
    mapping: "Control mapping",
    mapping_note: "Which 等保2.0 (GB/T 22239-2019) security-audit items and NIST SP 800-53 controls each table and built-in indicator supports.",
    control: "Control",
    sections: "Report sections",
    indicators: "Built-in indicators and rules",
    footer: "This report and events.csv, alerts.csv and the *.jsonl files are listed with their SHA-256 in manifest.json, signed with the collector's certificate (manifest.sig) and chained to the previous export; check with weilan-collector verify-export.",
};

pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
    pub fill: &'static str,
    pub title: String,
}

pub struct Label {
    pub x: f64,
    pub y: f64,
    pub anchor: &'static str,
    pub text: String,
}

pub struct Chart {
    pub title: String,
    pub width: f64,
    pub height: f64,
    pub rects: Vec<Rect>,
    pub labels: Vec<Label>,
}

pub const RED: &str = "#c62828";
pub const YELLOW: &str = "#f9a825";
pub const BLUE: &str = "#1565c0";
const BAR: &str = "#546e7a";

/// Stacked bars per day: `days` is (day, [red, yellow, blue]) in order.
pub fn day_chart(title: &str, days: &[(String, [u64; 3])]) -> Chart {
    let (left, top, plot_h) = (40.0, 24.0, 160.0);
    let step = if days.is_empty() {
        20.0
    } else {
        (720.0 / days.len() as f64).clamp(6.0, 40.0)
    };
    // Wide enough for the title even with one day.
    let width = (left + step * days.len().max(1) as f64 + 20.0).max(420.0);
    let max = days
        .iter()
        .map(|(_, c)| c.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut rects = Vec::new();
    let mut labels = vec![
        Label {
            x: left - 4.0,
            y: top + 8.0,
            anchor: "end",
            text: (max as u64).to_string(),
        },
        Label {
            x: left - 4.0,
            y: top + plot_h,
            anchor: "end",
            text: "0".into(),
        },
    ];
    for (i, (day, counts)) in days.iter().enumerate() {
        let x = left + step * i as f64;
        let mut y = top + plot_h;
        for (n, fill) in counts.iter().zip([RED, YELLOW, BLUE]) {
            if *n == 0 {
                continue;
            }
            let h = plot_h * *n as f64 / max;
            y -= h;
            rects.push(Rect {
                x,
                y,
                w: step * 0.8,
                h,
                fill,
                title: format!("{day}: {n}"),
            });
        }
        if days.len() <= 31 || i % (days.len() / 15 + 1) == 0 {
            labels.push(Label {
                x: x + step * 0.4,
                y: top + plot_h + 14.0,
                anchor: "middle",
                text: day.get(5..).unwrap_or(day).to_string(),
            });
        }
    }
    Chart {
        title: title.into(),
        width,
        height: top + plot_h + 24.0,
        rects,
        labels,
    }
}

/// Horizontal bars, largest first (at most 10).
pub fn top_chart(title: &str, items: &[(String, u64)]) -> Chart {
    let rows: Vec<&(String, u64)> = items.iter().take(10).collect();
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1) as f64;
    let (left, top, row_h) = (260.0, 24.0, 20.0);
    let mut rects = Vec::new();
    let mut labels = Vec::new();
    for (i, (name, n)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let w = 420.0 * *n as f64 / max;
        rects.push(Rect {
            x: left,
            y,
            w: w.max(1.0),
            h: row_h - 4.0,
            fill: BAR,
            title: format!("{name}: {n}"),
        });
        let shown: String = name.chars().take(38).collect();
        labels.push(Label {
            x: left - 6.0,
            y: y + 12.0,
            anchor: "end",
            text: shown,
        });
        labels.push(Label {
            x: left + w + 4.0,
            y: y + 12.0,
            anchor: "start",
            text: n.to_string(),
        });
    }
    Chart {
        title: title.into(),
        width: 760.0,
        height: top + row_h * rows.len().max(1) as f64 + 8.0,
        rects,
        labels,
    }
}

pub struct AlertRow {
    pub time: String,
    pub agent: String,
    pub rule: String,
    pub summary: String,
}

pub struct DeviceRow {
    pub target: String,
    pub device: String,
    pub agent: String,
    pub rule: String,
    pub count: u64,
}

pub struct FileRow {
    pub time: String,
    pub agent: String,
    pub user: String,
    pub path: String,
    pub classification: String,
    pub action: String,
}

pub struct TransferRow {
    pub time: String,
    pub agent: String,
    pub user: String,
    pub process: String,
    pub destination: String,
    pub bytes: u64,
}

pub struct UnlockRow {
    pub time: String,
    pub agent: String,
    pub status: String,
    pub device: String,
    pub reason: String,
}

pub struct MappingRow {
    pub control: String,
    pub sections: String,
    pub rules: String,
}

#[derive(Template)]
#[template(path = "report.html")]
pub struct Report<'a> {
    pub t: &'a Texts,
    pub lang: &'a str,
    pub period_from: String,
    pub period_to: String,
    pub timezone: String,
    pub scope: String,
    pub generated: String,
    pub generator: String,
    pub events_total: u64,
    pub alerts_total: u64,
    pub red: u64,
    pub yellow: u64,
    pub blue: u64,
    pub days: Chart,
    pub tops: Vec<Chart>,
    pub expected: usize,
    pub reporting: usize,
    pub not_reporting: Vec<String>,
    pub silent: Vec<AlertRow>,
    pub policies: Vec<(String, String)>,
    pub usb: Vec<DeviceRow>,
    pub files: Vec<FileRow>,
    pub files_total: u64,
    pub transfers: Vec<TransferRow>,
    pub transfers_total: u64,
    pub unlocks: Vec<UnlockRow>,
    pub failures: Vec<AlertRow>,
    pub integrity: Vec<AlertRow>,
    pub mapping: Vec<MappingRow>,
}

/// Report sections and the controls they serve (the indicators come from rule tags).
pub fn section_controls(lang: Lang) -> Vec<(&'static str, &'static str)> {
    let zh = lang == Lang::Zh;
    vec![
        (
            "等保2.0 8.1.4.3 安全审计 a)",
            if zh {
                "事件表（events.csv）、每日告警图"
            } else {
                "events table (events.csv), alerts per day"
            },
        ),
        (
            "等保2.0 8.1.4.3 安全审计 b)",
            if zh {
                "事件与告警的时间、终端、用户、规则字段"
            } else {
                "time, agent, user and rule of every event and alert"
            },
        ),
        (
            "等保2.0 8.1.4.3 安全审计 c)",
            if zh {
                "日志缺口与篡改告警、manifest 签名与哈希链"
            } else {
                "journal gaps and tamper alerts, signed manifest and hash chain"
            },
        ),
        (
            "等保2.0 8.1.5.4 集中管控",
            if zh {
                "终端覆盖、生效的策略版本"
            } else {
                "fleet coverage, policy versions in force"
            },
        ),
        (
            "NIST AU-2",
            if zh {
                "事件表：记录哪些事件"
            } else {
                "events table: which events are logged"
            },
        ),
        (
            "NIST AU-3",
            if zh {
                "事件与告警字段（时间、来源、主体、结果）"
            } else {
                "event and alert fields (time, source, subject, outcome)"
            },
        ),
        (
            "NIST AU-6",
            if zh {
                "告警总数、USB 决定、外发文件与传输"
            } else {
                "alerts by level, USB decisions, exports and transfers"
            },
        ),
        (
            "NIST AU-9",
            if zh {
                "日志缺口与篡改告警、签名与哈希链"
            } else {
                "journal gaps and tamper alerts, signature and hash chain"
            },
        ),
        (
            "NIST AU-12",
            if zh {
                "终端覆盖：哪些终端在产生记录"
            } else {
                "fleet coverage: which agents produce records"
            },
        ),
    ]
}
