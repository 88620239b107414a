//! Text of the legacy binary office formats, which are OLE2 compound files (read with
//! the `cfb` crate): Word 97–2003 `.doc` and WPS Writer `.wps` (the `WordDocument`
//! stream: text through the piece table, page headers first), Excel 97–2003 `.xls`
//! and WPS Spreadsheets `.et` (the `Workbook` stream, BIFF8: shared strings, text and
//! number cells, row by row), PowerPoint 97–2003 `.ppt` and WPS Presentation `.dps`
//! (the `PowerPoint Document` stream: text atoms).
//!
//! Read here rather than with `calamine` (which reads `.xls`): calamine lays every
//! sheet out as a dense grid when the workbook is opened, so two cells at opposite
//! corners of a 65 536 × 256 sheet cost half a gigabyte — a few hundred bytes of
//! crafted file would take the agent's memory. These readers keep only the text,
//! bounded by the caller's byte budget. Encrypted files are reported as such.

use std::io::{Read, Seek};

/// What the compound file held.
pub enum OleText {
    Text {
        text: String,
        format: &'static str,
    },
    /// Password-protected: the content cannot be read.
    Encrypted(&'static str),
    /// A compound file with none of the streams above (an `.msg`, a `.vsd` …).
    Unknown,
}

/// Reads the text of an OLE2 compound file, reading at most `max_bytes` of its
/// streams.
pub fn extract<R: Read + Seek>(file: R, max_bytes: u64) -> Result<OleText, String> {
    let mut cfb = cfb::CompoundFile::open(file).map_err(|e| format!("not a compound file: {e}"))?;
    let mut stream = |name: &str| -> Result<Option<Vec<u8>>, String> {
        if !cfb.is_stream(name) {
            return Ok(None);
        }
        let mut s = cfb.open_stream(name).map_err(|e| format!("{name}: {e}"))?;
        let mut bytes = Vec::new();
        s.by_ref()
            .take(max_bytes)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Some(bytes))
    };
    if let Some(word) = stream("WordDocument")? {
        let table_name = if fib_u16(&word, 0x0A).is_some_and(|f| f & 0x0200 != 0) {
            "1Table"
        } else {
            "0Table"
        };
        let table = stream(table_name)?.unwrap_or_default();
        return word_text(&word, &table);
    }
    for name in ["Workbook", "Book"] {
        if let Some(book) = stream(name)? {
            return biff_text(&book);
        }
    }
    if let Some(ppt) = stream("PowerPoint Document")? {
        if cfb.is_stream("EncryptedSummary") {
            return Ok(OleText::Encrypted("ppt"));
        }
        return Ok(OleText::Text {
            text: ppt_text(&ppt),
            format: "ppt",
        });
    }
    Ok(OleText::Unknown)
}

fn fib_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn fib_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Word 97–2003 ([MS-DOC]): the FIB names the piece table (`Clx` in the table
/// stream); each piece is a run of character positions stored at a file offset,
/// UTF-16 or (flag 0x40000000) one byte per character. The main text comes first in
/// character positions, then footnotes, then headers: headers are put first here, as
/// a mark in the page header is the document's first line.
fn word_text(word: &[u8], table: &[u8]) -> Result<OleText, String> {
    let bad = |what: &str| format!("doc: {what}");
    if fib_u16(word, 0) != Some(0xA5EC) {
        return Err(bad("no Word 97 FIB"));
    }
    let flags = fib_u16(word, 0x0A).ok_or_else(|| bad("short FIB"))?;
    if flags & 0x0100 != 0 {
        return Ok(OleText::Encrypted("doc"));
    }
    let ccp = |at: usize| fib_u32(word, 64 + at).unwrap_or(0) as usize;
    let (ccp_text, ccp_ftn, ccp_hdd) = (ccp(12), ccp(16), ccp(20));
    let fc_clx = fib_u32(word, 0x01A2).ok_or_else(|| bad("short FIB"))? as usize;
    let lcb_clx = fib_u32(word, 0x01A6).ok_or_else(|| bad("short FIB"))? as usize;
    let clx = table
        .get(fc_clx..fc_clx.saturating_add(lcb_clx))
        .ok_or_else(|| bad("piece table outside the table stream"))?;
    // Skip the property modifiers (`Prc`, 0x01) to the piece table (`Pcdt`, 0x02).
    let mut at = 0;
    while clx.get(at) == Some(&0x01) {
        at += 3 + fib_u16(clx, at + 1).ok_or_else(|| bad("short Prc"))? as usize;
    }
    if clx.get(at) != Some(&0x02) {
        return Err(bad("no piece table"));
    }
    let plc = clx
        .get(at + 5..(at + 5).saturating_add(fib_u32(clx, at + 1).unwrap_or(0) as usize))
        .ok_or_else(|| bad("short piece table"))?;
    let pieces = plc.len().saturating_sub(4) / 12;
    let mut chars: Vec<u16> = Vec::new();
    for i in 0..pieces {
        let cp_start = fib_u32(plc, i * 4).unwrap_or(0) as usize;
        let cp_end = fib_u32(plc, i * 4 + 4).unwrap_or(0) as usize;
        let pcd = 4 * (pieces + 1) + i * 8;
        let fc = fib_u32(plc, pcd + 2).ok_or_else(|| bad("short piece"))?;
        let n = cp_end.saturating_sub(cp_start);
        let outside = || bad("piece outside the text");
        if fc & 0x4000_0000 != 0 {
            let from = ((fc & !0x4000_0000) / 2) as usize;
            let bytes = word.get(from..from.saturating_add(n)).ok_or_else(outside)?;
            chars.extend(bytes.iter().map(|b| cp1252(*b)));
        } else {
            let from = fc as usize;
            let end = from.saturating_add(n.saturating_mul(2));
            let bytes = word.get(from..end).ok_or_else(outside)?;
            chars.extend(
                bytes
                    .chunks_exact(2)
                    .map(|p| u16::from_le_bytes([p[0], p[1]])),
            );
        }
    }
    let part = |from: usize, len: usize| {
        let end = from.saturating_add(len).min(chars.len());
        word_chars(&chars[from.min(end)..end])
    };
    let headers = part(ccp_text.saturating_add(ccp_ftn), ccp_hdd);
    let body = part(0, if ccp_text == 0 { chars.len() } else { ccp_text });
    let notes = part(ccp_text, ccp_ftn);
    let text = [headers, body, notes]
        .into_iter()
        .filter(|t| !t.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    Ok(OleText::Text {
        text,
        format: "doc",
    })
}

/// Word's characters as text: paragraph, cell, line and page ends as line breaks;
/// field and object markers dropped.
fn word_chars(units: &[u16]) -> String {
    let mapped: Vec<u16> = units
        .iter()
        .filter_map(|u| match u {
            0x0D | 0x07 | 0x0B | 0x0C => Some(0x0A),
            0x00..=0x08 | 0x13..=0x15 => None,
            _ => Some(*u),
        })
        .collect();
    String::from_utf16_lossy(&mapped)
}

/// Windows-1252 (Word's 8-bit pieces) to UTF-16.
fn cp1252(b: u8) -> u16 {
    let byte = [b];
    let (text, _, _) = encoding_rs::WINDOWS_1252.decode(&byte);
    text.encode_utf16().next().unwrap_or(0xFFFD)
}

/// BIFF8 ([MS-XLS]): records of type, length and data. The shared string table
/// (`SST`, continued over `CONTINUE` records) is read first; then each sheet's text
/// cells (`LABELSST`, `LABEL`), numbers (`NUMBER`, `RK`, `MULRK`) and formula
/// strings (`STRING`) in record order, one line per row.
fn biff_text(book: &[u8]) -> Result<OleText, String> {
    let records = biff_records(book);
    if records.iter().any(|(t, _)| *t == 0x002F) {
        return Ok(OleText::Encrypted("xls"));
    }
    let mut sst: Vec<String> = Vec::new();
    let mut out = Rows::default();
    let mut i = 0;
    while i < records.len() {
        let (kind, data) = records[i];
        let row = || u16::from_le_bytes([data[0], data[1]]);
        match kind {
            0x00FC => {
                // The SST and the CONTINUE records after it, kept apart: a string's
                // characters that cross into the next record restart with a flag byte.
                let mut parts = vec![data];
                while records.get(i + 1).is_some_and(|(t, _)| *t == 0x003C) {
                    i += 1;
                    parts.push(records[i].1);
                }
                sst = shared_strings(&parts);
            }
            0x00FD if data.len() >= 10 => {
                let isst = fib_u32(data, 6).unwrap_or(u32::MAX) as usize;
                if let Some(s) = sst.get(isst) {
                    out.cell(row(), s);
                }
            }
            0x0204 if data.len() >= 6 => {
                let parts = [data];
                let mut reader = BiffStrings::new(&parts);
                reader.pos = 6;
                if let Some(s) = reader.string() {
                    out.cell(row(), &s);
                }
            }
            0x0207 => {
                let parts = [data];
                if let Some(s) = BiffStrings::new(&parts).string() {
                    out.cell(out.row.unwrap_or(0), &s);
                }
            }
            0x0203 if data.len() >= 14 => {
                let v = f64::from_le_bytes(data[6..14].try_into().expect("8 bytes"));
                out.cell(row(), &number(v));
            }
            0x027E if data.len() >= 10 => {
                out.cell(row(), &number(rk(fib_u32(data, 6).unwrap_or(0))));
            }
            0x00BD if data.len() >= 6 => {
                for entry in data[4..data.len() - 2].chunks_exact(6) {
                    out.cell(row(), &number(rk(fib_u32(entry, 2).unwrap_or(0))));
                }
            }
            // A sheet's beginning: its first row starts a line.
            0x0809 if out.row.is_some() => {
                out.text.push('\n');
                out.row = None;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(OleText::Text {
        text: out.text,
        format: "xls",
    })
}

/// Cells as text: a tab between the cells of a row, a line per row.
#[derive(Default)]
struct Rows {
    text: String,
    row: Option<u16>,
}

impl Rows {
    fn cell(&mut self, row: u16, value: &str) {
        match self.row {
            Some(prev) if prev != row => self.text.push('\n'),
            Some(_) => self.text.push('\t'),
            None => {}
        }
        self.row = Some(row);
        self.text.push_str(value);
    }
}

fn biff_records(book: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= book.len() {
        let kind = u16::from_le_bytes([book[at], book[at + 1]]);
        let len = u16::from_le_bytes([book[at + 2], book[at + 3]]) as usize;
        let end = (at + 4 + len).min(book.len());
        out.push((kind, &book[at + 4..end]));
        at = end;
    }
    out
}

/// A number as a spreadsheet shows it: whole numbers without a fraction (a mobile
/// number typed into a cell is 13812345678, not 1.3812345678E10).
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// An `RK` number: a 30-bit integer or the high bits of a double, maybe × 1/100.
fn rk(raw: u32) -> f64 {
    let v = if raw & 2 != 0 {
        f64::from((raw as i32) >> 2)
    } else {
        f64::from_bits(u64::from(raw & 0xFFFF_FFFC) << 32)
    };
    if raw & 1 != 0 {
        v / 100.0
    } else {
        v
    }
}

/// The strings of an `SST` record and its continuations.
fn shared_strings(parts: &[&[u8]]) -> Vec<String> {
    let mut reader = BiffStrings::new(parts);
    reader.pos = 8;
    let unique = parts.first().and_then(|p| fib_u32(p, 4)).unwrap_or(0) as usize;
    let mut out = Vec::new();
    while out.len() < unique {
        match reader.string() {
            Some(s) => out.push(s),
            None => break,
        }
    }
    out
}

/// Reads `XLUnicodeRichExtendedString`s across record boundaries.
struct BiffStrings<'a> {
    parts: &'a [&'a [u8]],
    part: usize,
    pos: usize,
}

impl<'a> BiffStrings<'a> {
    fn new(parts: &'a [&'a [u8]]) -> Self {
        BiffStrings {
            parts,
            part: 0,
            pos: 0,
        }
    }

    fn remaining(&self) -> usize {
        self.parts
            .get(self.part)
            .map_or(0, |p| p.len().saturating_sub(self.pos))
    }

    /// Moves to the next record when this one is used up.
    fn next_part(&mut self) -> bool {
        if self.part + 1 < self.parts.len() {
            self.part += 1;
            self.pos = 0;
            true
        } else {
            false
        }
    }

    fn bytes(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.remaining() == 0 && !self.next_part() {
                return None;
            }
            let take = (n - out.len()).min(self.remaining());
            let p = self.parts[self.part];
            out.extend_from_slice(&p[self.pos..self.pos + take]);
            self.pos += take;
        }
        Some(out)
    }

    fn string(&mut self) -> Option<String> {
        if self.remaining() == 0 && !self.next_part() {
            return None;
        }
        let head = self.bytes(3)?;
        let mut chars = u16::from_le_bytes([head[0], head[1]]) as usize;
        let mut flags = head[2];
        let runs = if flags & 0x08 != 0 {
            let b = self.bytes(2)?;
            u16::from_le_bytes([b[0], b[1]]) as usize
        } else {
            0
        };
        let ext = if flags & 0x04 != 0 {
            let b = self.bytes(4)?;
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        } else {
            0
        };
        let mut units: Vec<u16> = Vec::with_capacity(chars);
        while chars > 0 {
            if self.remaining() == 0 {
                // Characters continue in the next record, after a new flag byte.
                if !self.next_part() {
                    return None;
                }
                flags = self.bytes(1)?[0];
            }
            let width = if flags & 0x01 != 0 { 2 } else { 1 };
            let fit = (self.remaining() / width).min(chars).max(1);
            let raw = self.bytes(fit * width)?;
            if width == 2 {
                units.extend(
                    raw.chunks_exact(2)
                        .map(|p| u16::from_le_bytes([p[0], p[1]])),
                );
            } else {
                units.extend(raw.iter().map(|b| u16::from(*b)));
            }
            chars -= fit;
        }
        self.skip(runs * 4 + ext)?;
        Some(String::from_utf16_lossy(&units))
    }

    /// Skips formatting runs and phonetic data (their declared size is not trusted
    /// with an allocation).
    fn skip(&mut self, mut n: usize) -> Option<()> {
        while n > 0 {
            if self.remaining() == 0 && !self.next_part() {
                return None;
            }
            let take = n.min(self.remaining());
            self.pos += take;
            n -= take;
        }
        Some(())
    }
}

/// PowerPoint 97–2003 ([MS-PPT]): records with an 8-byte header; containers
/// (version 0xF) are entered, and the text atoms anywhere in them — `TextCharsAtom`
/// (UTF-16) and `TextBytesAtom` (one byte per character) — give the text, one line
/// per atom.
fn ppt_text(stream: &[u8]) -> String {
    let mut text = String::new();
    let mut at = 0;
    while at + 8 <= stream.len() {
        let ver = stream[at] & 0x0F;
        let kind = u16::from_le_bytes([stream[at + 2], stream[at + 3]]);
        let len = fib_u32(stream, at + 4).unwrap_or(0) as usize;
        at += 8;
        if ver == 0x0F {
            continue;
        }
        let end = at.saturating_add(len).min(stream.len());
        let data = &stream[at..end];
        let line = match kind {
            0x0FA0 => Some(String::from_utf16_lossy(
                &data
                    .chunks_exact(2)
                    .map(|p| u16::from_le_bytes([p[0], p[1]]))
                    .collect::<Vec<_>>(),
            )),
            0x0FA8 => Some(data.iter().map(|b| char::from(*b)).collect()),
            _ => None,
        };
        if let Some(line) = line {
            text.push_str(&line.replace(['\r', '\u{b}'], "\n"));
            text.push('\n');
        }
        at = end;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::samples;

    fn text_of(bytes: Vec<u8>) -> (String, &'static str) {
        match extract(std::io::Cursor::new(bytes), 1 << 20).unwrap() {
            OleText::Text { text, format } => (text, format),
            OleText::Encrypted(f) => panic!("{f}: encrypted"),
            OleText::Unknown => panic!("unknown"),
        }
    }

    /// [`payroll`] as an Excel 97 workbook.
    fn payroll_xls() -> Vec<u8> {
        samples::xls(&payroll())
    }

    /// The rows of a payroll sheet long enough for the shared strings to cross
    /// several 8 224-byte records, some strings mid-character.
    fn payroll() -> Vec<Vec<String>> {
        let mut rows = vec![vec!["姓名".to_string(), "身份证号".into(), "电话".into()]];
        for i in 0..700 {
            rows.push(vec![
                format!("职工{i:03}（工资发放明细）"),
                "11010519491231002X".into(),
                format!("{}", 13_800_000_000u64 + i),
            ]);
        }
        rows
    }

    #[test]
    fn word_excel_and_powerpoint_97_text_is_read_headers_first() {
        let (text, format) = text_of(samples::doc(
            &["机密★1年"],
            &["关于下达预算的通知", "身份证 11010519491231002X"],
        ));
        assert_eq!(format, "doc");
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(
            lines,
            [
                "机密★1年",
                "关于下达预算的通知",
                "身份证 11010519491231002X"
            ]
        );

        let payroll_xls = payroll_xls();
        let (text, format) = text_of(payroll_xls.clone());
        assert_eq!(format, "xls");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 701, "one line per row");
        assert_eq!(lines[0], "姓名\t身份证号\t电话");
        assert_eq!(
            lines[700],
            "职工699（工资发放明细）\t11010519491231002X\t13800000699"
        );

        let (text, format) = text_of(samples::ppt(&[
            "秘密★启用前",
            "会议纪要\n联系人 13812345678",
        ]));
        assert_eq!(format, "ppt");
        assert_eq!(text, "秘密★启用前\n会议纪要\n联系人 13812345678\n");
    }

    /// The samples are real Office 97 files: catdoc's readers (another
    /// implementation of the formats) read the same text from them. (The RTF samples
    /// need no such check: their reader is another implementation already.)
    #[test]
    fn an_independent_reader_reads_the_same_samples() {
        let have = |tool: &str| std::process::Command::new(tool).arg("-V").output().is_ok();
        if !(have("catdoc") && have("xls2csv") && have("catppt")) {
            println!(
                "SKIPPED: catdoc, xls2csv and catppt are not installed (apt-get install catdoc)"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let read = |tool: &str, name: &str, bytes: Vec<u8>| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let out = std::process::Command::new(tool)
                .args(["-d", "utf-8"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let doc = read(
            "catdoc",
            "a.doc",
            samples::doc(&["机密★1年"], &["身份证 11010519491231002X"]),
        );
        assert!(
            doc.contains("机密★1年") && doc.contains("身份证 11010519491231002X"),
            "{doc}"
        );
        let payroll_xls = payroll_xls();
        let csv = read("xls2csv", "a.xls", payroll_xls.clone());
        // (xls2csv ends a sheet with a form feed.)
        let csv_lines: Vec<&str> = csv
            .lines()
            .filter(|l| !l.trim_matches('\u{c}').is_empty())
            .collect();
        assert_eq!(csv_lines.len(), 701, "{csv}");
        assert_eq!(
            csv_lines[700],
            "\"职工699（工资发放明细）\",\"11010519491231002X\",\"13800000699\""
        );
        let ppt = read("catppt", "a.ppt", samples::ppt(&["秘密★启用前"]));
        assert!(ppt.contains("秘密★启用前"), "{ppt}");
    }

    #[test]
    fn encrypted_and_crafted_files_are_reported_not_read() {
        // fEncrypted in the FIB.
        let mut doc = samples::doc(&[], &["text"]);
        let word = find(&doc, &[0xEC, 0xA5, 0xC1, 0x00]).expect("FIB");
        doc[word + 0x0B] |= 0x01; // 0x0100 of the little-endian flags word
        assert!(matches!(
            extract(std::io::Cursor::new(doc), 1 << 20),
            Ok(OleText::Encrypted("doc"))
        ));
        // A piece table whose piece ends 4 G characters on: an error, not a panic
        // or an allocation of its declared size.
        let mut doc = samples::doc(&[], &["text"]);
        let at = find(&doc, &[0x02, 0x10, 0, 0, 0]).expect("Pcdt");
        doc[at + 9..at + 13].copy_from_slice(&u32::MAX.to_le_bytes());
        match extract(std::io::Cursor::new(doc), 1 << 20) {
            Err(e) => assert!(e.starts_with("doc:"), "{e}"),
            Ok(_) => panic!("a piece of 4 G characters was read"),
        }
        // Not a compound file at all.
        assert!(extract(
            std::io::Cursor::new(b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1garbage".to_vec()),
            1 << 20
        )
        .is_err());
    }

    #[test]
    fn a_shared_string_that_declares_gigabytes_of_phonetic_data_allocates_nothing() {
        // One string with fExtSt and cbExtRst = 4 GiB - 1, in an SST of one record.
        let mut sst = 1u32.to_le_bytes().to_vec();
        sst.extend_from_slice(&1u32.to_le_bytes());
        sst.extend_from_slice(&2u16.to_le_bytes());
        sst.push(0x04);
        sst.extend_from_slice(&u32::MAX.to_le_bytes());
        sst.extend_from_slice(b"ab");
        assert!(shared_strings(&[&sst]).is_empty());
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }
}
