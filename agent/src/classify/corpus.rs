//! A labelled corpus of finance-bureau documents for the classification benchmark
//! (`benches/classify.rs`) and its test: sensitive documents, each carrying the
//! classes it is labelled with, and benign look-alikes that must carry none.
//!
//! Everything is drawn from a seeded random generator, so a corpus is reproducible
//! from its seed and another seed gives documents nobody has seen. The identifiers
//! are built with this module's own implementations of the standards (GB 11643,
//! GB 32100 with GB 11714, Luhn, the numbering plan's mobile segments) — not with
//! the detectors under test — and placed where real documents put them: in table
//! cells, in sentences, in Word runs split mid-number, in numeric spreadsheet cells,
//! in headers, in the Office 97 binary formats and RTF. The benign set holds what fooled earlier versions: 手机密码, 有机密封,
//! 机密性, 内部控制, 内部收益率, a confidentiality clause, an English e-mail footer,
//! identity numbers with a wrong check character or an impossible date, invoice
//! numbers and codes, landlines, service numbers, corporate accounts and random digit
//! strings of the lengths serial numbers have.
//!
//! Not in the shipped agent: `cfg(test)` or the `test-util` feature.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use super::samples;

/// The classes the corpus labels, as the detectors name them.
pub const CLASSES: &[&str] = &[
    "mark:top-secret",
    "mark:secret",
    "mark:confidential",
    "mark:internal",
    "mark:trade-secret",
    "mark:sensitive",
    "mark:org-confidential",
    "prc-resident-id",
    "prc-social-credit-code",
    "bank-card",
    "prc-mobile",
];

/// The formats documents are written in.
pub const FORMATS: &[&str] = &[
    "txt", "gb18030", "utf16", "csv", "docx", "xlsx", "pptx", "ofd", "pdf", "zip", "tar.gz", "7z",
    "doc", "xls", "ppt", "rtf",
];

/// One generated document.
pub struct Document {
    /// A file name with the format's extension.
    pub name: String,
    pub format: &'static str,
    pub bytes: Vec<u8>,
    /// The classes it carries; empty for a benign document.
    pub expected: Vec<&'static str>,
}

/// `count` documents from `seed`: half sensitive (each of [`CLASSES`] in turn, some
/// with a second class), half benign; formats in turn.
pub fn generate(seed: u64, count: usize) -> Vec<Document> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let format = FORMATS[(i / 2) % FORMATS.len()];
            let mut expected = Vec::new();
            if i % 2 == 0 {
                expected.push(CLASSES[(i / 2 / FORMATS.len() + i / 2) % CLASSES.len()]);
                if rng.random_bool(0.25) {
                    let second = *CLASSES.choose(&mut rng).expect("classes");
                    if !is_mark(second) || !expected.iter().any(|c| is_mark(c)) {
                        expected.push(second);
                    }
                }
                expected.dedup();
            }
            let doc = compose(&mut rng, &expected);
            let bytes = render(&mut rng, &doc, format);
            let kind = if expected.is_empty() {
                "benign"
            } else {
                "sensitive"
            };
            Document {
                name: format!("{i:05}-{kind}.{format}"),
                format,
                bytes,
                expected,
            }
        })
        .collect()
}

fn is_mark(class: &str) -> bool {
    class.starts_with("mark:")
}

/// Draws one table cell of a column.
type CellMaker = Box<dyn Fn(&mut StdRng) -> Cell>;

/// A document before it is written in a format.
#[derive(Default)]
struct Doc {
    /// Lines above the title (份号, 密级和保密期限, 紧急程度), or a page header.
    head: Vec<String>,
    /// Put the head into the page header (docx) rather than the body.
    head_in_header: bool,
    title: String,
    paragraphs: Vec<String>,
    /// A table: its first row the column names.
    table: Vec<Vec<Cell>>,
}

#[derive(Clone)]
enum Cell {
    Text(String),
    /// A number typed into a spreadsheet cell (a mobile number, an amount).
    Number(u64),
}

/// The rows of a table as lines, cells joined by `sep`.
fn table_lines(table: &[Vec<Cell>], sep: &str) -> Vec<String> {
    table
        .iter()
        .map(|row| row.iter().map(Cell::text).collect::<Vec<_>>().join(sep))
        .collect()
}

impl Cell {
    fn text(&self) -> String {
        match self {
            Cell::Text(t) => t.clone(),
            Cell::Number(n) => n.to_string(),
        }
    }
}

fn compose(rng: &mut StdRng, expected: &[&'static str]) -> Doc {
    let mut doc = Doc {
        title: title(rng),
        ..Doc::default()
    };
    if rng.random_bool(0.3) {
        doc.head
            .push(format!("{:06}", rng.random_range(1..999_999)));
    }
    let people = rng.random_range(2..8);
    for _ in 0..rng.random_range(2..6) {
        doc.paragraphs.push(sentence(rng));
    }
    // Look-alikes in every document, sensitive or not: they must not add a class.
    for _ in 0..rng.random_range(2..5) {
        let at = rng.random_range(0..=doc.paragraphs.len());
        let lookalike = lookalike(rng);
        doc.paragraphs.insert(at, lookalike);
    }
    let mut columns = vec!["序号", "姓名", "部门", "金额（元）"];
    let mut values: Vec<CellMaker> = vec![
        Box::new(|r| Cell::Text(name(r))),
        Box::new(|r| Cell::Text(DEPARTMENTS.choose(r).expect("list").to_string())),
        Box::new(|r| Cell::Text(amount(r))),
    ];
    for class in expected {
        match *class {
            "prc-resident-id" => {
                if rng.random_bool(0.5) {
                    columns.push("身份证号码");
                    values.push(Box::new(|r| Cell::Text(resident_id(r))));
                } else {
                    let at = rng.random_range(0..=doc.paragraphs.len());
                    let id = resident_id(rng);
                    // Typed with an input method in full-width mode, now and then.
                    let id = if rng.random_bool(0.25) {
                        full_width(&id)
                    } else {
                        id
                    };
                    let who = name(rng);
                    doc.paragraphs
                        .insert(at, format!("经办人{who}（身份证号{id}）已核对无误。"));
                }
            }
            "prc-social-credit-code" => {
                let code = social_credit_code(rng);
                let company = company(rng);
                let at = rng.random_range(0..=doc.paragraphs.len());
                doc.paragraphs.insert(
                    at,
                    match rng.random_range(0..3) {
                        0 => format!("供应商：{company}，统一社会信用代码：{code}。"),
                        1 => format!("{company}（信用代码 {code}）中标。"),
                        _ => format!("收款单位 {company} {code}"),
                    },
                );
            }
            "bank-card" => {
                if rng.random_bool(0.6) {
                    columns.push(*["银行卡号", "工资卡号", "账号"].choose(rng).expect("list"));
                    values.push(Box::new(|r| Cell::Text(bank_card(r, false))));
                } else {
                    let card = bank_card(rng, true);
                    let who = name(rng);
                    let at = rng.random_range(0..=doc.paragraphs.len());
                    doc.paragraphs.insert(
                        at,
                        format!("请将报销款转入{who}的{card}，开户行为本市分行。"),
                    );
                }
            }
            "prc-mobile" => {
                if rng.random_bool(0.6) {
                    columns.push("联系电话");
                    values.push(Box::new(|r| {
                        if r.random_bool(0.4) {
                            Cell::Number(mobile_digits(r).parse().expect("digits"))
                        } else {
                            Cell::Text(mobile(r))
                        }
                    }));
                } else {
                    let who = name(rng);
                    let phone = mobile(rng);
                    let phone = if rng.random_bool(0.25) {
                        full_width(&phone)
                    } else {
                        phone
                    };
                    let at = rng.random_range(0..=doc.paragraphs.len());
                    doc.paragraphs
                        .insert(at, format!("联系人：{who}，电话{phone}，请于三日内回复。"));
                }
            }
            mark => place_mark(rng, &mut doc, mark),
        }
    }
    if columns.len() > 4 || rng.random_bool(0.5) {
        let mut table = vec![columns.iter().map(|c| Cell::Text(c.to_string())).collect()];
        for row in 0..people {
            let mut cells = vec![Cell::Number(row as u64 + 1)];
            cells.extend(values.iter().map(|v| v(rng)));
            table.push(cells);
        }
        doc.table = table;
    }
    if doc.head.is_empty() && rng.random_bool(0.2) {
        doc.head.push(
            ["特急", "加急", "平急"]
                .choose(rng)
                .expect("list")
                .to_string(),
        );
    }
    doc
}

/// A classification mark in one of its standard forms, where such marks stand: above
/// the title (after the copy number), in the page header, or as the first line.
fn place_mark(rng: &mut StdRng, doc: &mut Doc, class: &str) {
    let level = match class {
        "mark:top-secret" => "绝密",
        "mark:secret" => "机密",
        "mark:confidential" => "秘密",
        _ => "",
    };
    let mark = if !level.is_empty() {
        let period = match rng.random_range(0..6) {
            0 => format!("{}年", rng.random_range(1..=30)),
            1 => "启用前".to_string(),
            2 => "长期".to_string(),
            3 => format!("{}个月", rng.random_range(1..=12)),
            4 => format!(
                "{}年",
                ["一", "二", "三", "五", "十", "二十"]
                    .choose(rng)
                    .expect("list")
            ),
            _ => String::new(),
        };
        // Some templates space the level's two characters apart to align them.
        let spaced: String = level
            .chars()
            .map(String::from)
            .collect::<Vec<_>>()
            .join("\u{3000}");
        match rng.random_range(0..11) {
            0..=5 => format!("{level}★{period}"),
            6 => format!("{level} ★ {period}"),
            7 => format!("密级：{level}"),
            8 => format!("【{level}】"),
            9 => format!("{spaced}★{period}"),
            _ => level.to_string(),
        }
    } else {
        let forms: &[&str] = match class {
            "mark:internal" => &[
                "内部资料",
                "内部文件",
                "仅供内部使用",
                "内部★",
                "内部",
                "INTERNAL USE ONLY",
                "内部资料 注意保存",
            ],
            "mark:trade-secret" => &["商业秘密★", "商业秘密★5年", "商业秘密"],
            "mark:sensitive" => &["敏感★", "敏感信息★", "敏感"],
            _ => &["CONFIDENTIAL", "STRICTLY CONFIDENTIAL", "Confidential"],
        };
        forms.choose(rng).expect("list").to_string()
    };
    doc.head.push(mark);
    doc.head_in_header = rng.random_bool(0.3);
}

const SURNAMES: &[&str] = &[
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
    "何", "高", "林", "罗", "郑", "梁", "谢", "宋", "唐", "许", "韩", "冯", "邓", "曹", "欧阳",
    "司马",
];
const GIVEN: &[&str] = &[
    "伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟",
    "涛", "明", "超", "秀兰", "霞", "平", "刚", "桂英", "建国", "晓东", "思远", "雨萱", "子涵",
];
const DEPARTMENTS: &[&str] = &[
    "预算科",
    "国库科",
    "综合科",
    "行政政法科",
    "农业农村科",
    "社会保障科",
    "经济建设科",
    "政府采购办",
    "会计科",
    "票据管理中心",
    "绩效管理科",
    "办公室",
    "资产管理科",
    "债务管理科",
];
const CITIES: &[&str] = &[
    "杭州", "南京", "成都", "武汉", "西安", "长沙", "合肥", "福州", "济南", "郑州",
];
const TRADES: &[&str] = &[
    "信息技术",
    "建设工程",
    "办公设备",
    "物业服务",
    "会计师事务所",
    "印刷",
    "软件",
];

fn name(rng: &mut StdRng) -> String {
    format!(
        "{}{}",
        SURNAMES.choose(rng).expect("list"),
        GIVEN.choose(rng).expect("list")
    )
}

fn company(rng: &mut StdRng) -> String {
    format!(
        "{}{}{}有限公司",
        CITIES.choose(rng).expect("list"),
        ["华", "信", "联", "达", "安", "恒", "瑞"]
            .choose(rng)
            .expect("list"),
        TRADES.choose(rng).expect("list")
    )
}

fn amount(rng: &mut StdRng) -> String {
    let cents: u64 = rng.random_range(100..2_000_000_000);
    let yuan = cents / 100;
    let mut digits = yuan.to_string();
    let mut grouped = String::new();
    while digits.len() > 3 {
        let tail = digits.split_off(digits.len() - 3);
        grouped = format!(",{tail}{grouped}");
    }
    format!("{digits}{grouped}.{:02}", cents % 100)
}

fn title(rng: &mut StdRng) -> String {
    let year = rng.random_range(2020..=2026);
    let subjects = [
        format!("关于下达{year}年部门预算的通知"),
        format!("{year}年度财政专项资金拨付明细"),
        format!("关于{year}年政府采购项目验收情况的报告"),
        format!("{year}年第{}季度工资发放明细表", rng.random_range(1..=4)),
        format!("关于开展{year}年会计信息质量检查的通知"),
        format!("{year}年社会保险缴费人员名单"),
        "非税收入票据核销清单".to_string(),
        "部门整体支出绩效自评报告".to_string(),
        "国有资产处置审批表".to_string(),
        "地方政府专项债券项目资金使用情况".to_string(),
    ];
    subjects.choose(rng).expect("list").clone()
}

fn sentence(rng: &mut StdRng) -> String {
    let dept = DEPARTMENTS.choose(rng).expect("list");
    let year = rng.random_range(2020..=2026);
    let month = rng.random_range(1..=12);
    let day = rng.random_range(1..=28);
    let amount = amount(rng);
    let n = rng.random_range(1..=60);
    let templates = [
        format!(
            "根据《中华人民共和国预算法》及其实施条例，现将{year}年{month}月预算执行情况通报如下。"
        ),
        format!(
            "截至{year}年{month}月{day}日，{dept}累计拨付资金{amount}元，执行率{}.{}%。",
            rng.random_range(40..100),
            rng.random_range(0..10)
        ),
        format!(
            "请各单位于{month}月{day}日前将材料报送{dept}，联系电话：0571-8{:07}。",
            rng.random_range(0..10_000_000)
        ),
        format!("文号：财预〔{year}〕{n}号，抄送：市审计局、市国资委。"),
        format!(
            "本项目采购预算{amount}元，采用公开招标方式，共有{}家供应商参与。",
            rng.random_range(3..12)
        ),
        format!(
            "{dept}对{n}个项目开展绩效评价，发现问题{}项，已督促整改。",
            rng.random_range(0..20)
        ),
        format!("会议于{year}年{month}月{day}日在三楼会议室召开，参会人员{n}名。"),
        "各单位要严格执行中央八项规定精神，厉行节约，反对浪费。".to_string(),
        format!(
            "邮政编码：{}，地址：{}市政务中心{}号楼。",
            rng.random_range(100_000..860_000),
            CITIES.choose(rng).expect("list"),
            rng.random_range(1..30)
        ),
    ];
    templates.choose(rng).expect("list").clone()
}

/// Text that looks like a class and is not one.
/// ASCII digits and letters as a Chinese input method types them in full-width mode
/// (U+FF10…, U+FF21…), written here independently of the classifier's reading.
fn full_width(ascii: &str) -> String {
    ascii
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                char::from_u32(c as u32 + 0xFEE0).expect("full-width form")
            } else {
                c
            }
        })
        .collect()
}

fn lookalike(rng: &mut StdRng) -> String {
    let phrase_of = |rng: &mut StdRng| {
        [
            "请勿向他人透露手机密码及短信验证码。",
            "管道接口采用有机密封材料，耐压等级1.6MPa。",
            "系统应保障数据的机密性、完整性和可用性。",
            "进一步健全单位内部控制制度，防范廉政风险。",
            "经测算，项目内部收益率为8.5%，投资回收期6年。",
            "双方对在合作中知悉的对方商业秘密负有保密义务。",
            "敏感性分析表明，利率变动对债务成本影响较大。",
            "本文件不涉及国家秘密，可以在门户网站公开。",
            "开展内部审计，重点检查三公经费支出。",
            "涉密人员离岗须经脱密期管理。",
            "This e-mail and any attachments are confidential and intended solely for the addressee.",
            "秘密投票结果将于会后公布。",
            "服务满意度评价：★★★★☆",
            "★ 重点项目：老旧小区改造",
            "部门内部调剂使用的资金应当报财政部门备案。",
            "价格敏感商品清单见附件。",
        ]
        .choose(rng)
        .expect("list")
        .to_string()
    };
    match rng.random_range(0..15) {
        0..=3 => phrase_of(rng),
        4 => format!(
            "身份证号 {}（校验位有误，已退回）",
            resident_id_wrong_check(rng)
        ),
        5 => format!("证件号码：{}", resident_id_impossible_date(rng)),
        // A wrong check character typed in full width is still wrong.
        14 => format!(
            "身份证号：{}（待核实）",
            full_width(&resident_id_wrong_check(rng))
        ),
        6 => format!(
            "发票代码：{:012}，发票号码：{:08}。",
            rng.random_range(0..1_000_000_000_000u64),
            rng.random_range(0..100_000_000u64)
        ),
        7 => format!(
            "全电发票号码 {}{:018}",
            rng.random_range(20..=26),
            rng.random_range(0..1_000_000_000_000_000_000u64)
        ),
        8 => format!(
            "服务热线 400-{:03}-{:04}，传真 010-{:08}，分机 {}",
            rng.random_range(100..1000),
            rng.random_range(0..10_000),
            rng.random_range(10_000_000..100_000_000),
            rng.random_range(100..10_000)
        ),
        9 => format!(
            "基本户账号：{}{:015}（单位结算账户）",
            ["1202", "3100", "4402", "3301"].choose(rng).expect("list"),
            rng.random_range(0..1_000_000_000_000_000u64)
        ),
        10 => format!(
            "合同编号 HT-{}-{:06}，订单号 {}{:08}",
            rng.random_range(2020..=2026),
            rng.random_range(0..1_000_000),
            rng.random_range(20200101..20261231),
            rng.random_range(0..100_000_000)
        ),
        11 => format!("流水号：{}", random_digits(rng)),
        12 => format!(
            "非移动号段号码 {}{:08}",
            ["100", "101", "110", "120", "140", "144", "154", "160", "161", "179"]
                .choose(rng)
                .expect("list"),
            rng.random_range(0..100_000_000)
        ),
        _ => format!(
            "科目编码 {} {} {} {}",
            rng.random_range(1000..7000),
            rng.random_range(1000..7000),
            rng.random_range(1000..7000),
            rng.random_range(1000..7000)
        ),
    }
}

/// A random digit string of a length serial numbers have (not 11: an 11-digit number
/// in a mobile segment *is* a mobile number by the numbering plan).
fn random_digits(rng: &mut StdRng) -> String {
    let len = *[8usize, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20, 24]
        .choose(rng)
        .expect("list");
    (0..len)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

/// County-level region codes (GB/T 2260) across the provinces.
const REGIONS: &[&str] = &[
    "110105", "110108", "120101", "130102", "140105", "150102", "210102", "220102", "230103",
    "310104", "310115", "320102", "320506", "330106", "330203", "340104", "350203", "360102",
    "370202", "410105", "420106", "430104", "440106", "440305", "450103", "460106", "500103",
    "510107", "520102", "530102", "540102", "610113", "620102", "630102", "640104", "650102",
];

/// GB 11643 check character, computed here independently of the detectors.
fn gb11643_check(first17: &str) -> char {
    let weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = first17
        .bytes()
        .zip(weights)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'][(sum % 11) as usize]
}

fn birth_date(rng: &mut StdRng) -> String {
    let year = rng.random_range(1950..=2006);
    let month = rng.random_range(1..=12);
    let days = match month {
        2 if year % 4 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    format!("{year}{month:02}{:02}", rng.random_range(1..=days))
}

fn resident_id_body(rng: &mut StdRng) -> String {
    format!(
        "{}{}{:03}",
        REGIONS.choose(rng).expect("list"),
        birth_date(rng),
        rng.random_range(0..1000)
    )
}

fn resident_id(rng: &mut StdRng) -> String {
    let body = resident_id_body(rng);
    let check = gb11643_check(&body);
    // Lower-case x is how many forms have it typed.
    let check = if check == 'X' && rng.random_bool(0.3) {
        'x'
    } else {
        check
    };
    format!("{body}{check}")
}

fn resident_id_wrong_check(rng: &mut StdRng) -> String {
    let body = resident_id_body(rng);
    let right = gb11643_check(&body);
    let wrong = *['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'X']
        .iter()
        .filter(|c| **c != right)
        .collect::<Vec<_>>()
        .choose(rng)
        .expect("list");
    format!("{body}{wrong}")
}

fn resident_id_impossible_date(rng: &mut StdRng) -> String {
    let date = format!(
        "{}{}",
        rng.random_range(1950..=2006),
        ["1301", "0230", "0431", "0000", "1232", "0631"]
            .choose(rng)
            .expect("list")
    );
    let body = format!(
        "{}{date}{:03}",
        REGIONS.choose(rng).expect("list"),
        rng.random_range(0..1000)
    );
    let check = gb11643_check(&body);
    format!("{body}{check}")
}

const USCC_CHARS: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";

/// GB 32100 code: registration authority and category, region, GB 11714
/// organisation code with its check character, the code's check character.
fn social_credit_code(rng: &mut StdRng) -> String {
    let authority = [
        "11", "12", "13", "19", "51", "52", "53", "59", "91", "92", "93", "Y1",
    ]
    .choose(rng)
    .expect("list");
    let org: String = (0..8)
        .map(|_| {
            if rng.random_bool(0.85) {
                char::from(b'0' + rng.random_range(0..10u8))
            } else {
                char::from(*USCC_CHARS[10..].choose(rng).expect("list"))
            }
        })
        .collect();
    let org_value = |c: u8| match c {
        b'0'..=b'9' => u32::from(c - b'0'),
        _ => u32::from(c - b'A') + 10,
    };
    let sum: u32 = org
        .bytes()
        .zip([3, 7, 9, 10, 5, 8, 4, 2])
        .map(|(c, w)| org_value(c) * w)
        .sum();
    let org_check = match 11 - sum % 11 {
        10 => 'X',
        11 => '0',
        d => char::from(b'0' + d as u8),
    };
    let first17 = format!(
        "{authority}{}{org}{org_check}",
        REGIONS.choose(rng).expect("list")
    );
    let value = |c: u8| USCC_CHARS.iter().position(|a| *a == c).expect("alphabet") as u32;
    let mut weight = 1;
    let mut sum = 0;
    for c in first17.bytes() {
        sum += value(c) * weight;
        weight = weight * 3 % 31;
    }
    let check = USCC_CHARS[((31 - sum % 31) % 31) as usize];
    format!("{first17}{}", char::from(check))
}

/// A card number: a real issuer prefix and that issuer's length, Luhn check digit.
/// UnionPay debit and credit cards mostly; a Visa or Mastercard only with a card word
/// before it (`with_word`), as such numbers are written in a sentence.
fn bank_card(rng: &mut StdRng, with_word: bool) -> String {
    let unionpay: &[(&str, usize)] = &[
        ("622202", 19),
        ("622848", 19),
        ("621700", 19),
        ("621661", 19),
        ("622588", 16),
        ("622262", 19),
        ("623058", 19),
        ("625807", 16),
        ("622908", 16),
        ("621226", 19),
        ("628288", 16),
    ];
    let foreign: &[(&str, usize)] = &[("438088", 16), ("524070", 16), ("356895", 16)];
    let foreign_card = with_word && rng.random_bool(0.3);
    let (prefix, len) = if foreign_card {
        *foreign.choose(rng).expect("list")
    } else {
        *unionpay.choose(rng).expect("list")
    };
    let mut digits: Vec<u8> = prefix.bytes().map(|b| b - b'0').collect();
    while digits.len() < len - 1 {
        digits.push(rng.random_range(0..10));
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(*d);
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    digits.push(((10 - sum % 10) % 10) as u8);
    let plain: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
    let number = if rng.random_bool(0.25) {
        plain
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).expect("digits"))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        plain
    };
    if with_word {
        let word = if foreign_card {
            "信用卡"
        } else {
            *["银行卡", "借记卡", "工资卡", "储蓄卡"]
                .choose(rng)
                .expect("list")
        };
        format!("{word}（卡号 {number}）")
    } else {
        number
    }
}

/// Mobile segments of the numbering plan, listed here from the plan, not the detector.
const MOBILE_SEGMENTS: &[&str] = &[
    "130", "131", "132", "133", "134", "135", "136", "137", "138", "139", "145", "147", "149",
    "150", "151", "152", "153", "155", "156", "157", "158", "159", "162", "165", "166", "167",
    "170", "171", "172", "173", "175", "176", "177", "178", "180", "181", "182", "183", "184",
    "185", "186", "187", "188", "189", "190", "191", "192", "193", "195", "196", "197", "198",
    "199",
];

fn mobile_digits(rng: &mut StdRng) -> String {
    format!(
        "{}{:08}",
        MOBILE_SEGMENTS.choose(rng).expect("list"),
        rng.random_range(0..100_000_000)
    )
}

fn mobile(rng: &mut StdRng) -> String {
    let d = mobile_digits(rng);
    match rng.random_range(0..10) {
        0 => format!("{} {} {}", &d[..3], &d[3..7], &d[7..]),
        1 => format!("{}-{}-{}", &d[..3], &d[3..7], &d[7..]),
        2 => format!("+86 {d}"),
        3 => format!("+86-{d}"),
        _ => d,
    }
}

/// Writes `doc` in `format`.
fn render(rng: &mut StdRng, doc: &Doc, format: &str) -> Vec<u8> {
    let lines = |sep: &str| -> Vec<String> {
        let mut l: Vec<String> = doc.head.clone();
        l.push(doc.title.clone());
        l.extend(doc.paragraphs.iter().cloned());
        l.extend(table_lines(&doc.table, sep));
        l
    };
    match format {
        "txt" => lines("\t").join("\r\n").into_bytes(),
        "gb18030" => samples::gb18030(&lines("  ").join("\r\n")),
        "utf16" => {
            let text = lines("\t").join("\r\n");
            if rng.random_bool(0.5) {
                samples::utf16le(&text)
            } else {
                // Without a byte-order mark, as some exporters write it.
                text.encode_utf16().flat_map(u16::to_le_bytes).collect()
            }
        }
        "csv" => {
            let mut text = if rng.random_bool(0.3) {
                "\u{feff}".to_string()
            } else {
                String::new()
            };
            text.push_str(&lines(",").join("\n"));
            text.into_bytes()
        }
        "docx" => docx(rng, doc),
        "doc" => word97(doc),
        "rtf" => {
            let (header, body) = if doc.head_in_header {
                (doc.head.clone(), lines("\t")[doc.head.len()..].to_vec())
            } else {
                (Vec::new(), lines("\t"))
            };
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            let body: Vec<&str> = body.iter().map(String::as_str).collect();
            samples::rtf(&header, &body, rng.random_bool(0.5))
        }
        "xls" => excel97(doc),
        "ppt" => powerpoint97(doc),
        "xlsx" => xlsx(doc),
        "pptx" => pptx(doc),
        "ofd" => {
            let all = lines(" ");
            let pages: Vec<&str> = all.iter().map(String::as_str).collect();
            ofd_pages(&pages)
        }
        "pdf" => {
            let all = lines("  ");
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            // Embedded CID fonts with ToUnicode maps, as most exporters write; fonts left
            // to the reader with the predefined Unicode or GBK CMaps, as older ones do.
            match rng.random_range(0..4) {
                0 => samples::pdf_ucs2(&refs),
                1 => samples::pdf_gbk(&refs),
                _ => samples::pdf_cjk(&refs),
            }
        }
        "zip" => {
            let inner = if rng.random_bool(0.5) {
                docx(rng, doc)
            } else {
                lines(",").join("\n").into_bytes()
            };
            let name = if inner.starts_with(b"PK") {
                "材料/报告.docx"
            } else {
                "材料/名单.csv"
            };
            samples::zip(&[
                ("说明.txt", "附件材料，请查收。".as_bytes()),
                (name, &inner),
            ])
        }
        "7z" => {
            let inner = if rng.random_bool(0.5) {
                pptx(doc)
            } else {
                samples::gb18030(&lines("  ").join("\r\n"))
            };
            let name = if inner.starts_with(b"PK") {
                "汇报/汇报.pptx"
            } else {
                "汇报/纪要.txt"
            };
            let readme = "压缩包内为会议材料。".as_bytes();
            samples::seven_zip(
                &[("说明.txt", readme), (name, &inner)],
                rng.random_bool(0.5),
            )
        }
        _ => {
            let inner = if rng.random_bool(0.5) {
                xlsx(doc)
            } else {
                lines("\t").join("\n").into_bytes()
            };
            let name = if inner.starts_with(b"PK") {
                "data/明细.xlsx"
            } else {
                "data/明细.txt"
            };
            samples::gzip(&samples::tar(&[(name, &inner)]), false)
        }
    }
}

/// Word 97–2003: the head in the page header story or above the title.
fn word97(doc: &Doc) -> Vec<u8> {
    let mut body: Vec<String> = Vec::new();
    if !doc.head_in_header {
        body.extend(doc.head.iter().cloned());
    }
    body.push(doc.title.clone());
    body.extend(doc.paragraphs.iter().cloned());
    body.extend(table_lines(&doc.table, "\t"));
    let header: Vec<&str> = if doc.head_in_header {
        doc.head.iter().map(String::as_str).collect()
    } else {
        Vec::new()
    };
    let body: Vec<&str> = body.iter().map(String::as_str).collect();
    samples::doc(&header, &body)
}

/// Excel 97–2003: a line of text per row, then the table.
fn excel97(doc: &Doc) -> Vec<u8> {
    let rows: Vec<Vec<String>> = doc
        .head
        .iter()
        .chain([&doc.title])
        .chain(&doc.paragraphs)
        .map(|t| vec![t.clone()])
        .chain(
            doc.table
                .iter()
                .map(|row| row.iter().map(Cell::text).collect()),
        )
        .collect();
    samples::xls(&rows)
}

/// PowerPoint 97–2003: head and title, paragraphs, table rows — a slide each.
fn powerpoint97(doc: &Doc) -> Vec<u8> {
    let mut first: Vec<String> = doc.head.clone();
    first.push(doc.title.clone());
    let rows: Vec<String> = table_lines(&doc.table, "  ");
    let slides = [first.join("\n"), doc.paragraphs.join("\n"), rows.join("\n")];
    let slides: Vec<&str> = slides.iter().map(String::as_str).collect();
    samples::ppt(&slides)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A Word paragraph whose text is cut into runs at random places (as editing history
/// and spell-check marks cut real ones), some with markup between them.
fn word_paragraph(rng: &mut StdRng, text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut cuts: Vec<usize> = (0..rng.random_range(0..4))
        .map(|_| rng.random_range(0..=chars.len()))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut runs = String::new();
    let mut from = 0;
    for to in cuts.into_iter().chain([chars.len()]) {
        let piece: String = chars[from..to].iter().collect();
        from = to;
        if piece.is_empty() {
            continue;
        }
        let props = if rng.random_bool(0.3) {
            "<w:rPr><w:rFonts w:hint=\"eastAsia\"/></w:rPr>"
        } else {
            ""
        };
        runs.push_str(&format!(
            "<w:r>{props}<w:t xml:space=\"preserve\">{}</w:t></w:r>",
            escape(&piece)
        ));
        if rng.random_bool(0.2) {
            runs.push_str("<w:proofErr w:type=\"spellStart\"/>");
        }
    }
    format!("<w:p><w:pPr><w:jc w:val=\"both\"/></w:pPr>{runs}</w:p>")
}

const W_NS: &str = "xmlns:w=\"http://schemas.openxmlformats.org/wordprocessingml/2006/main\"";

fn docx(rng: &mut StdRng, doc: &Doc) -> Vec<u8> {
    let mut body = String::new();
    if !doc.head_in_header {
        for h in &doc.head {
            body.push_str(&word_paragraph(rng, h));
        }
    }
    body.push_str(&word_paragraph(rng, &doc.title));
    for p in &doc.paragraphs {
        body.push_str(&word_paragraph(rng, p));
    }
    if !doc.table.is_empty() {
        body.push_str("<w:tbl>");
        for row in &doc.table {
            body.push_str("<w:tr>");
            for cell in row {
                let p = word_paragraph(rng, &cell.text());
                body.push_str(&format!("<w:tc>{p}</w:tc>"));
            }
            body.push_str("</w:tr>");
        }
        body.push_str("</w:tbl>");
    }
    let document = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><w:document {W_NS}><w:body>{body}</w:body></w:document>"
    );
    let mut parts: Vec<(String, Vec<u8>)> = vec![
        ("[Content_Types].xml".into(), b"<Types/>".to_vec()),
        ("word/document.xml".into(), document.into_bytes()),
    ];
    if doc.head_in_header {
        let paragraphs: String = doc.head.iter().map(|h| word_paragraph(rng, h)).collect();
        parts.push((
            "word/header1.xml".into(),
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><w:hdr {W_NS}>{paragraphs}</w:hdr>")
                .into_bytes(),
        ));
    }
    parts.push((
        "word/footer1.xml".into(),
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><w:ftr {W_NS}><w:p><w:r><w:t>第 1 页</w:t></w:r></w:p></w:ftr>").into_bytes(),
    ));
    let refs: Vec<(&str, &[u8])> = parts
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    samples::zip(&refs)
}

fn xlsx(doc: &Doc) -> Vec<u8> {
    let mut rows: Vec<Vec<Cell>> = doc
        .head
        .iter()
        .chain([&doc.title])
        .chain(&doc.paragraphs)
        .map(|t| vec![Cell::Text(t.clone())])
        .collect();
    rows.extend(doc.table.iter().cloned());
    let mut shared: Vec<String> = Vec::new();
    let mut sheet = String::new();
    for (r, row) in rows.iter().enumerate() {
        sheet.push_str(&format!("<row r=\"{}\">", r + 1));
        for (c, cell) in row.iter().enumerate() {
            let at = format!("{}{}", char::from(b'A' + c as u8), r + 1);
            match cell {
                Cell::Text(t) => {
                    shared.push(format!("<si><t>{}</t></si>", escape(t)));
                    sheet.push_str(&format!(
                        "<c r=\"{at}\" t=\"s\"><v>{}</v></c>",
                        shared.len() - 1
                    ));
                }
                Cell::Number(n) => sheet.push_str(&format!("<c r=\"{at}\"><v>{n}</v></c>")),
            }
        }
        sheet.push_str("</row>");
    }
    let ns = "xmlns=\"http://schemas.openxmlformats.org/spreadsheetml/2006/main\"";
    let sst = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><sst {ns} count=\"{0}\" uniqueCount=\"{0}\">{1}</sst>",
        shared.len(),
        shared.concat()
    );
    let sheet = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><worksheet {ns}><sheetData>{sheet}</sheetData></worksheet>"
    );
    samples::zip(&[
        ("[Content_Types].xml", b"<Types/>"),
        ("xl/workbook.xml", b"<workbook/>"),
        ("xl/sharedStrings.xml", sst.as_bytes()),
        ("xl/worksheets/sheet1.xml", sheet.as_bytes()),
    ])
}

fn pptx(doc: &Doc) -> Vec<u8> {
    let paragraphs = |lines: &[String]| -> String {
        lines
            .iter()
            .map(|l| format!("<a:p><a:r><a:t>{}</a:t></a:r></a:p>", escape(l)))
            .collect()
    };
    let slide = |body: String| {
        format!(
            "<p:sld xmlns:p=\"http://schemas.openxmlformats.org/presentationml/2006/main\" xmlns:a=\"http://schemas.openxmlformats.org/drawingml/2006/main\"><p:cSld><p:spTree><p:sp><p:txBody>{body}</p:txBody></p:sp></p:spTree></p:cSld></p:sld>"
        )
    };
    let mut first: Vec<String> = doc.head.clone();
    first.push(doc.title.clone());
    let rows: Vec<String> = table_lines(&doc.table, "  ");
    let slides = [
        slide(paragraphs(&first)),
        slide(paragraphs(&doc.paragraphs)),
        slide(paragraphs(&rows)),
    ];
    let names: Vec<String> = (1..=slides.len())
        .map(|i| format!("ppt/slides/slide{i}.xml"))
        .collect();
    let mut parts: Vec<(&str, &[u8])> = vec![("[Content_Types].xml", b"<Types/>")];
    parts.extend(
        names
            .iter()
            .zip(&slides)
            .map(|(n, s)| (n.as_str(), s.as_bytes())),
    );
    samples::zip(&parts)
}

/// An OFD document with all `lines` on one page, one text object each.
fn ofd_pages(lines: &[&str]) -> Vec<u8> {
    let objects: String = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "<ofd:TextObject ID=\"{}\"><ofd:TextCode X=\"20\" Y=\"{}\">{}</ofd:TextCode></ofd:TextObject>",
                i + 1,
                20 + 6 * i,
                escape(l)
            )
        })
        .collect();
    let page = format!(
        "<ofd:Page xmlns:ofd=\"http://www.ofdspec.org/2016\"><ofd:Content><ofd:Layer>{objects}</ofd:Layer></ofd:Content></ofd:Page>"
    );
    samples::zip(&[
        (
            "OFD.xml",
            br#"<ofd:OFD xmlns:ofd="http://www.ofdspec.org/2016"/>"#,
        ),
        ("Doc_0/Pages/Page_0/Content.xml", page.as_bytes()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generators_own_check_characters_match_published_examples() {
        // GB 11643's own example, and a credit code printed on a business licence.
        assert_eq!(gb11643_check("11010519491231002"), 'X');
        let code = "91350100M000100Y43";
        let mut weight = 1;
        let mut sum = 0;
        for c in code[..17].bytes() {
            sum += USCC_CHARS.iter().position(|a| *a == c).unwrap() as u32 * weight;
            weight = weight * 3 % 31;
        }
        assert_eq!(USCC_CHARS[((31 - sum % 31) % 31) as usize], b'3');
    }

    /// The acceptance of "Classification an officer can trust" on a corpus the
    /// benchmark does not use (seed 99): every labelled class found (recall ≥ 99 %
    /// per class, so no miss at this size), benign documents flagged by the
    /// national-secret and identity classes at most 0.1 % (none here), by the
    /// others at most 0.5 % (one here). `cargo bench --bench classify` reports the
    /// same on 2 200 documents of any seed.
    #[test]
    fn a_corpus_it_was_not_tuned_on_is_classified_within_the_acceptance() {
        let docs = generate(99, 440);
        let classifier = super::super::Classifier::default();
        let dir = tempfile::tempdir().unwrap();
        let mut misses = Vec::new();
        let mut benign_hits: std::collections::BTreeMap<String, usize> = Default::default();
        for doc in &docs {
            let path = dir.path().join(&doc.name);
            std::fs::write(&path, &doc.bytes).unwrap();
            let (found, note) = classifier.classify_file(std::fs::File::open(&path).unwrap());
            let found: Vec<&str> = found.iter().map(|c| c.detector.as_str()).collect();
            for class in &doc.expected {
                if !found.contains(class) {
                    misses.push(format!("{}: {class} not in {found:?} ({note:?})", doc.name));
                }
            }
            if doc.expected.is_empty() {
                for class in found.iter().filter(|c| CLASSES.contains(c)) {
                    *benign_hits.entry(class.to_string()).or_default() += 1;
                }
            }
        }
        assert!(misses.is_empty(), "{misses:#?}");
        let benign = docs.iter().filter(|d| d.expected.is_empty()).count();
        for (class, hits) in benign_hits {
            let strict = [
                "mark:top-secret",
                "mark:secret",
                "mark:confidential",
                "prc-resident-id",
            ]
            .contains(&class.as_str());
            let allowed = if strict { benign / 1000 } else { benign / 200 };
            assert!(
                hits <= allowed,
                "{class}: {hits} of {benign} benign documents"
            );
        }
    }

    /// A detector added to the contract's list must get documents here too.
    #[test]
    fn the_corpus_labels_every_built_in_class_but_unreadable() {
        let mut contract: Vec<&str> = weilan_config::policy::files::BUILTIN_DETECTORS
            .iter()
            .copied()
            .filter(|d| *d != crate::classify::UNREADABLE)
            .collect();
        contract.sort_unstable();
        let mut labelled = CLASSES.to_vec();
        labelled.sort_unstable();
        assert_eq!(labelled, contract);
    }

    #[test]
    fn a_corpus_is_the_same_for_the_same_seed_and_labels_half_its_documents() {
        let count = 4 * FORMATS.len();
        let a = generate(7, count);
        let b = generate(7, count);
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.bytes == y.bytes && x.expected == y.expected));
        assert_eq!(
            a.iter().filter(|d| d.expected.is_empty()).count(),
            count / 2
        );
        for class in CLASSES {
            assert!(a.iter().any(|d| d.expected.contains(class)), "{class}");
        }
        for format in FORMATS {
            assert_eq!(
                a.iter().filter(|d| d.format == *format).count(),
                4,
                "{format}"
            );
        }
    }
}
