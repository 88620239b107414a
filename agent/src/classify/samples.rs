//! Documents of every format the classifier reads, built in memory for tests (and for
//! the corpus of the classification benchmark): the smallest files the real readers
//! accept, with the text placed where real documents put it (Word runs, shared strings
//! and numeric cells, OFD text objects, archive entries). Not in the shipped agent:
//! `cfg(test)` or the `test-util` feature.

use std::io::Write;

/// A zip of `parts` (name, bytes), deflated like office files are.
pub fn zip(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, body) in parts {
        z.start_file(*name, opts).expect("in-memory zip");
        z.write_all(body).expect("in-memory zip");
    }
    z.finish().expect("in-memory zip").into_inner()
}

/// A 7z archive of `entries` (name, bytes), LZMA2 as 7-Zip writes by default; `solid`
/// packs them into one stream (7-Zip's default), else one stream each.
pub fn seven_zip(entries: &[(&str, &[u8])], solid: bool) -> Vec<u8> {
    use sevenz_rust2::{ArchiveEntry, ArchiveWriter, SourceReader};
    let mut w = ArchiveWriter::new(std::io::Cursor::new(Vec::new())).expect("in-memory 7z");
    if solid {
        let names = entries
            .iter()
            .map(|(n, _)| ArchiveEntry::new_file(n))
            .collect();
        let readers = entries.iter().map(|(_, b)| SourceReader::new(*b)).collect();
        w.push_archive_entries(names, readers)
            .expect("in-memory 7z");
    } else {
        for (name, body) in entries {
            w.push_archive_entry(ArchiveEntry::new_file(name), Some(*body))
                .expect("in-memory 7z");
        }
    }
    w.finish().expect("in-memory 7z").into_inner()
}

/// A 7z archive whose compressed header claims to unpack to 1 TiB: a reader that
/// sizes its buffer from that claim fails to allocate and aborts. Every checksum is
/// right, so only the claim is wrong. (Run only through the agent's memory-capped
/// child: in a test process it would abort the test.)
pub fn seven_zip_header_bomb() -> Vec<u8> {
    let names: Vec<String> = (0..40).map(|i| format!("f{i}.txt")).collect();
    let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    edit_7z_header(seven_zip(&entries, true), |header| {
        assert_eq!(header[0], 0x17, "the writer compressed its header");
        // kCodersUnpackSize (0x0C), then the size as a 7z number: a first byte whose
        // leading one bits count the bytes that follow.
        let at = header
            .iter()
            .position(|&b| b == 0x0C)
            .expect("unpack sizes");
        let extra = header[at + 1].leading_ones() as usize;
        let mut lying = header[..=at].to_vec();
        lying.push(0xFF);
        lying.extend_from_slice(&(1u64 << 40).to_le_bytes());
        lying.extend_from_slice(&header[at + 2 + extra..]);
        lying
    })
}

/// A 7z archive of one small entry whose LZMA2 coder asks for a 4 GiB dictionary,
/// which its decoder zero-fills before it decodes a byte.
pub fn seven_zip_dictionary_bomb() -> Vec<u8> {
    edit_7z_header(seven_zip(&[("a.txt", b"abc")], false), |header| {
        assert_eq!(header[0], 0x01, "a plain header");
        // The coder: flags 0x21 (one-byte id, with properties), LZMA2 (0x21), one byte
        // of properties: the dictionary size code, 40 = 4 GiB - 1.
        let at = header
            .windows(3)
            .position(|w| w == [0x21, 0x21, 0x01])
            .expect("an LZMA2 coder");
        let mut lying = header.to_vec();
        lying[at + 3] = 40;
        lying
    })
}

/// `archive` with its (last) header replaced by `edit`'s, every checksum made right.
fn edit_7z_header(mut archive: Vec<u8>, edit: impl FnOnce(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let word = |a: &[u8], at: usize| u64::from_le_bytes(a[at..at + 8].try_into().unwrap());
    let (offset, size) = (word(&archive, 12) as usize, word(&archive, 20) as usize);
    let header = edit(&archive[32 + offset..32 + offset + size]);
    archive.truncate(32 + offset);
    archive.extend_from_slice(&header);
    archive[20..28].copy_from_slice(&(header.len() as u64).to_le_bytes());
    archive[28..32].copy_from_slice(&crc32fast::hash(&header).to_le_bytes());
    let start_crc = crc32fast::hash(&archive[12..32]);
    archive[8..12].copy_from_slice(&start_crc.to_le_bytes());
    archive
}

/// A ustar archive of regular files.
pub fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, body) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *body).expect("in-memory tar");
    }
    b.into_inner().expect("in-memory tar")
}

/// A gzip stream of `bytes`, deflated; `stored` keeps the bytes as they are in stored
/// deflate blocks (RFC 1951 3.2.4) — written here directly because a 10 000-deep nest
/// passes 2 GB through the encoder, 20 s even at level 0, and this is a memcpy.
pub fn gzip(bytes: &[u8], stored: bool) -> Vec<u8> {
    if !stored {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).expect("in-memory gzip");
        return e.finish().expect("in-memory gzip");
    }
    // Header: magic, deflate, no flags, no time, no extra flags, unknown OS.
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = bytes.chunks(0xFFFF).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xFF, 0xFF]);
    }
    while let Some(chunk) = chunks.next() {
        let last = u8::from(chunks.peek().is_none());
        let len = chunk.len() as u16;
        out.push(last);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out
}

/// XML text content with `&`, `<` and `>` escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A Word document: each paragraph is its runs, as Word splits text wherever the
/// formatting or the editing history changes.
pub fn docx(paragraphs: &[&[&str]]) -> Vec<u8> {
    let body: String = paragraphs
        .iter()
        .map(|runs| {
            let runs: String = runs
                .iter()
                .map(|r| format!("<w:r><w:t xml:space=\"preserve\">{}</w:t></w:r>", escape(r)))
                .collect();
            format!("<w:p>{runs}</w:p>")
        })
        .collect();
    let document = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>{body}</w:body></w:document>"#
    );
    zip(&[
        ("[Content_Types].xml", b"<Types/>"),
        ("word/document.xml", document.as_bytes()),
    ])
}

/// A workbook: `strings` in the shared-string table (one cell each in column A) and
/// `numbers` typed into cells as numbers (column B), as a spreadsheet stores them.
pub fn xlsx(strings: &[&str], numbers: &[u64]) -> Vec<u8> {
    let shared: String = strings
        .iter()
        .map(|s| format!("<si><t>{}</t></si>", escape(s)))
        .collect();
    let rows = strings.len().max(numbers.len());
    let cells: String = (0..rows)
        .map(|i| {
            let a = if i < strings.len() {
                format!(r#"<c r="A{0}" t="s"><v>{i}</v></c>"#, i + 1)
            } else {
                String::new()
            };
            let b = numbers
                .get(i)
                .map(|n| format!(r#"<c r="B{}"><v>{n}</v></c>"#, i + 1))
                .unwrap_or_default();
            format!(r#"<row r="{}">{a}{b}</row>"#, i + 1)
        })
        .collect();
    let sst = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" count="{0}" uniqueCount="{0}">{shared}</sst>"#,
        strings.len()
    );
    let sheet = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>{cells}</sheetData></worksheet>"#
    );
    zip(&[
        ("[Content_Types].xml", b"<Types/>"),
        ("xl/workbook.xml", b"<workbook/>"),
        ("xl/sharedStrings.xml", sst.as_bytes()),
        ("xl/worksheets/sheet1.xml", sheet.as_bytes()),
    ])
}

/// A presentation with one slide per text.
pub fn pptx(slides: &[&str]) -> Vec<u8> {
    let xml: Vec<(String, String)> = slides
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                format!("ppt/slides/slide{}.xml", i + 1),
                format!(
                    r#"<p:sld xmlns:p="p" xmlns:a="a"><p:cSld><p:spTree><p:sp><p:txBody><a:p><a:r><a:t>{}</a:t></a:r></a:p></p:txBody></p:sp></p:spTree></p:cSld></p:sld>"#,
                    escape(t)
                ),
            )
        })
        .collect();
    let mut parts: Vec<(&str, &[u8])> = vec![("[Content_Types].xml", b"<Types/>")];
    parts.extend(xml.iter().map(|(n, x)| (n.as_str(), x.as_bytes())));
    zip(&parts)
}

/// An OFD (GB/T 33190) document with one page per text.
pub fn ofd(pages: &[&str]) -> Vec<u8> {
    let xml: Vec<(String, String)> = pages
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                format!("Doc_0/Pages/Page_{i}/Content.xml"),
                format!(
                    r#"<ofd:Page xmlns:ofd="http://www.ofdspec.org/2016"><ofd:Content><ofd:Layer><ofd:TextObject ID="{i}"><ofd:TextCode X="0" Y="0">{}</ofd:TextCode></ofd:TextObject></ofd:Layer></ofd:Content></ofd:Page>"#,
                    escape(t)
                ),
            )
        })
        .collect();
    let mut parts: Vec<(&str, &[u8])> = vec![(
        "OFD.xml",
        br#"<ofd:OFD xmlns:ofd="http://www.ofdspec.org/2016"/>"#,
    )];
    parts.extend(xml.iter().map(|(n, x)| (n.as_str(), x.as_bytes())));
    zip(&parts)
}

/// A one-page PDF showing `line` in a standard font (Latin-1 text only).
pub fn pdf(line: &str) -> Vec<u8> {
    let content = format!("BT /F1 12 Tf 72 720 Td ({line}) Tj ET");
    pdf_objects(&[
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_string(),
    ])
}

/// A PDF showing `lines` (one per text line, any Unicode) the way office programs
/// export Chinese: a Type0 font with `Identity-H` encoding, each character drawn by a
/// glyph id (CID) and a `ToUnicode` CMap that maps the ids back to text; the font
/// itself is not embedded (readers of text do not need it).
pub fn pdf_cjk(lines: &[&str]) -> Vec<u8> {
    let mut cids: Vec<char> = Vec::new();
    let mut content = String::from("BT /F1 11 Tf 72 770 Td 14 TL\n");
    for line in lines {
        // Drawn as exporters draw justified text: glyph runs with small spacing
        // adjustments between them (`TJ`), every few characters.
        let mut array = String::from("<");
        for (i, c) in line.chars().enumerate() {
            let cid = match cids.iter().position(|&k| k == c) {
                Some(i) => i + 1,
                None => {
                    cids.push(c);
                    cids.len()
                }
            };
            if i > 0 && i % 3 == 0 {
                array.push_str(&format!("> {} <", -((i % 7) as i32) * 4));
            }
            array.push_str(&format!("{cid:04X}"));
        }
        content.push_str(&format!("[{array}>] TJ T*\n"));
    }
    content.push_str("ET");
    let mut cmap = String::from(
        "/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n\
         /CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n\
         /CMapName /Adobe-Identity-UCS def /CMapType 2 def\n\
         1 begincodespacerange <0000> <FFFF> endcodespacerange\n",
    );
    for block in cids.chunks(100).enumerate() {
        let (n, chars) = block;
        cmap.push_str(&format!("{} beginbfchar\n", chars.len()));
        for (i, c) in chars.iter().enumerate() {
            let utf16: String = c
                .encode_utf16(&mut [0; 2])
                .iter()
                .map(|u| format!("{u:04X}"))
                .collect();
            cmap.push_str(&format!("<{:04X}> <{utf16}>\n", n * 100 + i + 1));
        }
        cmap.push_str("endbfchar\n");
    }
    cmap.push_str("endcmap CMapName currentdict /CMap defineresource pop end end");
    pdf_objects(&[
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        "<< /Type /Font /Subtype /Type0 /BaseFont /SimSun /Encoding /Identity-H /DescendantFonts [6 0 R] /ToUnicode 7 0 R >>".to_string(),
        "<< /Type /Font /Subtype /CIDFontType2 /BaseFont /SimSun /CIDSystemInfo << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >> /FontDescriptor 8 0 R /DW 1000 >>".to_string(),
        format!("<< /Length {} >>\nstream\n{cmap}\nendstream", cmap.len()),
        "<< /Type /FontDescriptor /FontName /SimSun /Flags 4 /FontBBox [0 -120 1000 880] /ItalicAngle 0 /Ascent 880 /Descent -120 /CapHeight 700 /StemV 80 >>".to_string(),
    ])
}

/// A PDF showing `lines` in a font with the predefined CMap `UniGB-UCS2-H` (Adobe-GB1),
/// as older Chinese tools write it: each character drawn by its UCS-2 code, no
/// `ToUnicode` map — the reader must know the CMap.
pub fn pdf_ucs2(lines: &[&str]) -> Vec<u8> {
    let utf16 = |line: &str| line.encode_utf16().flat_map(u16::to_be_bytes).collect();
    pdf_predefined_cmap(lines, "UniGB-UCS2-H", utf16)
}

/// A PDF whose font uses the predefined CMap `GBK-EUC-H` (older Chinese exporters):
/// the strings are GBK bytes, ASCII as one byte, each Chinese character as two.
pub fn pdf_gbk(lines: &[&str]) -> Vec<u8> {
    let gbk = |line: &str| encoding_rs::GBK.encode(line).0.into_owned();
    pdf_predefined_cmap(lines, "GBK-EUC-H", gbk)
}

/// A PDF of `lines` in the STSong-Light font (not embedded) with the predefined
/// CMap `cmap`, each line's codes made by `encode`.
fn pdf_predefined_cmap(lines: &[&str], cmap: &str, encode: impl Fn(&str) -> Vec<u8>) -> Vec<u8> {
    let mut content = String::from("BT /F1 11 Tf 72 770 Td 14 TL\n");
    for line in lines {
        let hex: String = encode(line).iter().map(|b| format!("{b:02X}")).collect();
        content.push_str(&format!("<{hex}> Tj T*\n"));
    }
    content.push_str("ET");
    pdf_objects(&[
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        format!("<< /Type /Font /Subtype /Type0 /BaseFont /STSong-Light /Encoding /{cmap} /DescendantFonts [6 0 R] >>"),
        "<< /Type /Font /Subtype /CIDFontType0 /BaseFont /STSong-Light /CIDSystemInfo << /Registry (Adobe) /Ordering (GB1) /Supplement 2 >> /FontDescriptor 7 0 R /DW 1000 >>".to_string(),
        "<< /Type /FontDescriptor /FontName /STSong-Light /Flags 4 /FontBBox [0 -120 1000 880] /ItalicAngle 0 /Ascent 880 /Descent -120 /CapHeight 700 /StemV 80 >>".to_string(),
    ])
}

/// A PDF file of numbered `objects` (object 1 the catalog), with its cross-reference
/// table.
fn pdf_objects(objects: &[String]) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for o in offsets {
        out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// `text` in GB18030, as Chinese Windows programs save plain text.
pub fn gb18030(text: &str) -> Vec<u8> {
    encoding_rs::GB18030.encode(text).0.into_owned()
}

/// `text` in UTF-16LE with its byte-order mark, as Windows Notepad saves "Unicode".
pub fn utf16le(text: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0xFE];
    out.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    out
}

/// An OLE2 compound file of `streams` (name, bytes).
fn compound(streams: &[(&str, Vec<u8>)]) -> Vec<u8> {
    // Version 3 (512-byte sectors), as Office 97–2003 writes them.
    let mut cfb =
        cfb::CompoundFile::create_with_version(cfb::Version::V3, std::io::Cursor::new(Vec::new()))
            .expect("in-memory cfb");
    for (name, bytes) in streams {
        let mut s = cfb.create_stream(name).expect("in-memory cfb");
        s.write_all(bytes).expect("in-memory cfb");
    }
    cfb.flush().expect("in-memory cfb");
    cfb.into_inner().into_inner()
}

/// A Word 97–2003 document ([MS-DOC]): `body` paragraphs and `header` paragraphs (a
/// page header story after the main text, as Word stores it), UTF-16 text in one
/// piece of the piece table.
pub fn doc(header: &[&str], body: &[&str]) -> Vec<u8> {
    let paragraphs = |lines: &[&str]| -> Vec<u16> {
        lines
            .iter()
            .flat_map(|l| l.encode_utf16().chain([0x0D]))
            .collect()
    };
    let main = paragraphs(body);
    let head = paragraphs(header);
    let text: Vec<u16> = main.iter().chain(&head).copied().collect();
    const FC: usize = 1024;
    let mut word = vec![0u8; FC];
    let put16 =
        |w: &mut Vec<u8>, at: usize, v: u16| w[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |w: &mut Vec<u8>, at: usize, v: u32| w[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put16(&mut word, 0, 0xA5EC); // wIdent
    put16(&mut word, 2, 0x00C1); // nFib: Word 97
    put16(&mut word, 0x0A, 0x0200 | 0x1000); // fWhichTblStm (1Table), fExtChar
    put16(&mut word, 0x0C, 0x00BF); // nFibBack
    put32(&mut word, 0x18, FC as u32); // fcMin (older readers)
    put32(&mut word, 0x1C, (FC + 2 * text.len()) as u32); // fcMac
    put16(&mut word, 32, 14); // csw
    put16(&mut word, 62, 22); // cslw
    put32(&mut word, 64 + 12, main.len() as u32); // ccpText
    put32(&mut word, 64 + 20, head.len() as u32); // ccpHdd
    put16(&mut word, 152, 0x5D); // cbRgFcLcb
    word.extend(text.iter().flat_map(|u| u.to_le_bytes()));
    // Word's own streams are never below the 4 096-byte mini-stream cutoff.
    word.resize(word.len().max(4096), 0);
    let size = word.len() as u32;
    put32(&mut word, 64, size); // cbMac
                                // The piece table: one piece, all the text, UTF-16 at FC.
    let mut plc = Vec::new();
    plc.extend_from_slice(&0u32.to_le_bytes());
    plc.extend_from_slice(&(text.len() as u32).to_le_bytes());
    plc.extend_from_slice(&0u16.to_le_bytes());
    plc.extend_from_slice(&(FC as u32).to_le_bytes());
    plc.extend_from_slice(&0u16.to_le_bytes());
    let mut table = vec![0x02];
    table.extend_from_slice(&(plc.len() as u32).to_le_bytes());
    table.extend_from_slice(&plc);
    put32(&mut word, 0x01A2, 0); // fcClx
    put32(&mut word, 0x01A6, table.len() as u32); // lcbClx
    compound(&[("WordDocument", word), ("1Table", table)])
}

fn biff(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut r = kind.to_le_bytes().to_vec();
    r.extend_from_slice(&(data.len() as u16).to_le_bytes());
    r.extend_from_slice(data);
    r
}

/// An Excel 97–2003 workbook ([MS-XLS], BIFF8) with one sheet of `rows`: a cell of at
/// most 15 digits is a number cell (longer numbers — identity and card numbers — are
/// kept as text in real sheets, because a number cell holds only 15 significant
/// digits), any other a shared string; the shared string
/// table is split over `CONTINUE` records at BIFF8's 8 224-byte record limit, a
/// string's characters crossing a record boundary as Excel writes them. `rows` may be
/// borrowed (`&[&["a", "b"]]`) or owned (`&[vec![String]]`).
pub fn xls<Row: AsRef<[Cell]>, Cell: AsRef<str>>(rows: &[Row]) -> Vec<u8> {
    const MAX: usize = 8224;
    let rows: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| r.as_ref().iter().map(AsRef::as_ref).collect())
        .collect();
    let numeric = |cell: &str| {
        !cell.is_empty() && cell.len() <= 15 && cell.bytes().all(|b| b.is_ascii_digit())
    };
    let mut strings: Vec<&str> = Vec::new();
    for row in &rows {
        for cell in row.iter() {
            if !numeric(cell) && !strings.contains(cell) {
                strings.push(*cell);
            }
        }
    }
    // SST: records of at most MAX bytes.
    let mut records: Vec<Vec<u8>> = vec![Vec::new()];
    let total = strings.len() as u32;
    records[0].extend_from_slice(&total.to_le_bytes());
    records[0].extend_from_slice(&total.to_le_bytes());
    for s in &strings {
        let units: Vec<u16> = s.encode_utf16().collect();
        let wide = units.iter().any(|u| *u > 0xFF);
        if MAX - records.last().expect("record").len() < 4 + usize::from(wide) {
            records.push(Vec::new());
        }
        let r = records.last_mut().expect("record");
        r.extend_from_slice(&(units.len() as u16).to_le_bytes());
        r.push(u8::from(wide));
        for u in units {
            let width = if wide { 2 } else { 1 };
            if MAX - records.last().expect("record").len() < width {
                records.push(vec![u8::from(wide)]);
            }
            let r = records.last_mut().expect("record");
            if wide {
                r.extend_from_slice(&u.to_le_bytes());
            } else {
                r.push(u as u8);
            }
        }
    }
    let mut sst = Vec::new();
    for (i, r) in records.iter().enumerate() {
        sst.extend(biff(if i == 0 { 0x00FC } else { 0x003C }, r));
    }
    let bof = |dt: u16| {
        let mut d = 0x0600u16.to_le_bytes().to_vec();
        d.extend_from_slice(&dt.to_le_bytes());
        d.extend_from_slice(&[0xBB, 0x0D, 0xCC, 0x07, 0, 0, 0, 0, 0x06, 0, 0, 0]);
        biff(0x0809, &d)
    };
    let name = b"Sheet1";
    let boundsheet_len = 4 + 8 + 2 + name.len();
    let mut globals = bof(0x0005);
    globals.extend(biff(0x0042, &1200u16.to_le_bytes()));
    let sheet_at = globals.len() + boundsheet_len + sst.len() + 4;
    let mut bs = (sheet_at as u32).to_le_bytes().to_vec();
    bs.extend_from_slice(&[0, 0, name.len() as u8, 0]);
    bs.extend_from_slice(name);
    globals.extend(biff(0x0085, &bs));
    globals.extend(sst);
    globals.extend(biff(0x000A, &[]));
    let mut sheet = bof(0x0010);
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0) as u16;
    let mut dim = 0u32.to_le_bytes().to_vec();
    dim.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    dim.extend_from_slice(&0u16.to_le_bytes());
    dim.extend_from_slice(&cols.to_le_bytes());
    dim.extend_from_slice(&0u16.to_le_bytes());
    sheet.extend(biff(0x0200, &dim));
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let mut d = (r as u16).to_le_bytes().to_vec();
            d.extend_from_slice(&(c as u16).to_le_bytes());
            d.extend_from_slice(&0x000Fu16.to_le_bytes());
            if numeric(cell) {
                let v: f64 = cell.parse().expect("digits");
                d.extend_from_slice(&v.to_le_bytes());
                sheet.extend(biff(0x0203, &d));
            } else {
                let isst = strings.iter().position(|s| s == cell).expect("in the SST") as u32;
                d.extend_from_slice(&isst.to_le_bytes());
                sheet.extend(biff(0x00FD, &d));
            }
        }
    }
    sheet.extend(biff(0x000A, &[]));
    globals.extend(sheet);
    compound(&[("Workbook", globals)])
}

/// A PowerPoint 97–2003 presentation ([MS-PPT]): one slide's text per entry of
/// `slides`, as `TextCharsAtom`s in the document's slide list.
pub fn ppt(slides: &[&str]) -> Vec<u8> {
    let record = |ver_instance: u16, kind: u16, data: &[u8]| {
        let mut r = ver_instance.to_le_bytes().to_vec();
        r.extend_from_slice(&kind.to_le_bytes());
        r.extend_from_slice(&(data.len() as u32).to_le_bytes());
        r.extend_from_slice(data);
        r
    };
    let mut list = Vec::new();
    for (i, text) in slides.iter().enumerate() {
        let mut persist = vec![0u8; 20];
        persist[0..4].copy_from_slice(&(i as u32 + 1).to_le_bytes());
        list.extend(record(0, 0x03F3, &persist));
        list.extend(record(0, 0x0F9F, &1u32.to_le_bytes()));
        let chars: Vec<u8> = text
            .replace('\n', "\r")
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        list.extend(record(0, 0x0FA0, &chars));
    }
    let slide_list = record(0x000F, 0x0FF0, &list);
    let document = record(0x000F, 0x03E8, &slide_list);
    compound(&[("PowerPoint Document", document)])
}

/// An RTF document as Word writes Chinese ones: the page header story first, then the
/// body paragraphs; non-ASCII text as `\'hh` bytes in GBK (`\ansicpg936`) or, with
/// `unicode`, as `\uN?` escapes.
pub fn rtf(header: &[&str], body: &[&str], unicode: bool) -> Vec<u8> {
    let escape = |text: &str| -> String {
        let mut out = String::new();
        for c in text.chars() {
            match c {
                '\\' | '{' | '}' => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_ascii() => out.push(c),
                c if unicode => {
                    for u in c.encode_utf16(&mut [0; 2]) {
                        out.push_str(&format!("\\u{}?", *u as i16));
                    }
                }
                c => {
                    let one = c.to_string();
                    let (bytes, _, _) = encoding_rs::GBK.encode(&one);
                    for b in bytes.iter() {
                        out.push_str(&format!("\\'{b:02x}"));
                    }
                }
            }
        }
        out
    };
    let paragraphs = |lines: &[&str]| -> String {
        lines
            .iter()
            .map(|l| format!("\\pard\\plain\\f0 {}\\par\n", escape(l)))
            .collect()
    };
    let mut out = String::from(
        "{\\rtf1\\ansi\\ansicpg936\\deff0\\uc1{\\fonttbl{\\f0\\fnil\\fcharset134 \\'cb\\'ce\\'cc\\'e5;}}\n",
    );
    if !header.is_empty() {
        out.push_str(&format!("{{\\header {}}}\n", paragraphs(header)));
    }
    out.push_str(&paragraphs(body));
    out.push('}');
    out.into_bytes()
}
