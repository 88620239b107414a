//! Text extraction for classification, bounded in bytes read, bytes inflated and time.
//!
//! Plain text and CSV in UTF-8 (with or without BOM), GB18030 or UTF-16 (with or
//! without BOM), a few stray NUL or invalid bytes tolerated; the office formats that are
//! zip + XML (docx, pptx: runs joined per paragraph; xlsx: shared strings, inline
//! strings and numbers typed into cells; OFD, GB/T 33190: page text in page order);
//! zip, tar and 7z archives and gzip streams (`.tar.gz`) entry by entry, nested up to
//! three deep (compression bombs refused, unread entries named; 7z decompressed in a
//! memory-capped child process, [`super::sevenz`]); PDF text
//! (`pdf-extract`; CJK fonts through their `ToUnicode` map or a Unicode- or GBK-coded
//! predefined CMap such as `UniGB-UCS2-H` or `GBK-EUC-H`); the Office 97–2003 binary formats and WPS's
//! (`.doc`/`.wps`, `.xls`/`.et`, `.ppt`/`.dps`: [`super::ole`]); RTF (`rtf-parser-tt`,
//! GBK or `\uN` text, page headers first, hidden text included). Anything else is
//! reported as unsupported — never silently treated as "nothing found". Zip bombs are bounded by the inflated
//! byte budget, not by trusting the archive's declared sizes.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bounds for one file.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes read from the file (and, for archives, inflated in total).
    pub max_bytes: u64,
    /// Characters of text kept.
    pub max_chars: usize,
    pub max_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 32 * 1024 * 1024,
            max_chars: 4 * 1024 * 1024,
            max_time: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extracted {
    Text {
        text: String,
        /// `utf-8`, `gb18030`, `utf-16le`, `docx`, `xlsx`, `pptx`, `ofd`, `pdf`, `zip`,
        /// `tar` (a gzip stream gives the format of what it holds).
        format: &'static str,
        /// A bound was hit: the text is a prefix.
        truncated: bool,
        /// Parts that could not be read (an archive's encrypted or unreadable
        /// entries): the text is what the rest holds.
        unread: Option<String>,
    },
    /// A format this version does not read (`binary`, `zip`).
    Unsupported(&'static str),
    Failed(String),
}

/// Extracts text from the file at `path`.
pub fn extract(path: &Path, limits: Limits) -> Extracted {
    match std::fs::File::open(path) {
        Ok(f) => extract_file(f, limits),
        Err(e) => Extracted::Failed(format!("{}: {e}", path.display())),
    }
}

/// Extracts text from an open file (read from its start whatever its offset; used
/// with descriptors handed over by fanotify, which must not be re-opened by path).
pub fn extract_file(mut f: std::fs::File, limits: Limits) -> Extracted {
    use std::io::{Seek, SeekFrom};
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    if let Err(e) = f.seek(SeekFrom::Start(0)) {
        return Extracted::Failed(format!("seek: {e}"));
    }
    let mut head = [0u8; 8];
    let n = f.read(&mut head).unwrap_or(0);
    if let Err(e) = f.seek(SeekFrom::Start(0)) {
        return Extracted::Failed(format!("seek: {e}"));
    }
    if head[..n].starts_with(b"PK\x03\x04") {
        return office(f, limits, 0);
    }
    if head[..n].starts_with(&OLE2_MAGIC) {
        return compound(f, limits);
    }
    if head[..n].starts_with(b"{\\rtf") {
        return rtf(f, size, limits);
    }
    if let Some(kind) = unread_archive(&head[..n]) {
        return Extracted::Unsupported(kind);
    }
    // The data extents, up to the limit: a secret at the end of a sparse file (whose
    // first gigabytes are a hole) is read, the hole is not.
    let mut bytes = Vec::new();
    let mut data_bytes = 0u64;
    for (start, end) in crate::sparse::data_extents(&f, size) {
        data_bytes += end - start;
        let room = limits.max_bytes.saturating_sub(bytes.len() as u64);
        if room == 0 {
            continue;
        }
        if start > 0 && !bytes.is_empty() {
            bytes.push(b'\n');
        }
        let want = (end - start).min(room);
        let mut chunk = vec![0u8; want as usize];
        match std::os::unix::fs::FileExt::read_exact_at(&f, &mut chunk, start) {
            Ok(()) => bytes.extend_from_slice(&chunk),
            Err(e) => return Extracted::Failed(e.to_string()),
        }
    }
    // A PDF's cross-reference table and a 7z archive's header are at the file's end:
    // a prefix of either cannot be read.
    let indexed_at_end = if bytes.starts_with(b"%PDF") {
        Some("pdf")
    } else {
        is_7z(&bytes).then_some("7z")
    };
    if let Some(kind) = indexed_at_end.filter(|_| size > limits.max_bytes) {
        return Extracted::Failed(format!(
            "{kind} of {size} bytes is over the {} byte extraction limit",
            limits.max_bytes
        ));
    }
    if indexed_at_end.is_some() || bytes.starts_with(&[0x1f, 0x8b]) || is_tar(&bytes) {
        return extract_bytes(bytes, limits, 0);
    }
    if data_bytes < size {
        // A sparse file: its data pages are padded with zeros like its holes are;
        // those zeros are unwritten space, not content.
        bytes = squeeze_zeros(&bytes);
    }
    plain(&bytes, data_bytes > limits.max_bytes, limits)
}

/// Every run of NUL bytes as one line break.
fn squeeze_zeros(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if b != 0 {
            out.push(b);
        } else if out.last().is_some_and(|l| *l != b'\n') {
            out.push(b'\n');
        }
    }
    out
}

/// PDF text through `pdf-extract`, on a thread of its own ([`bounded`]): it can
/// panic on malformed input and cannot be interrupted.
fn pdf(bytes: Vec<u8>, limits: Limits) -> Extracted {
    static RUNAWAY: AtomicUsize = AtomicUsize::new(0);
    match read_bounded("pdf", &RUNAWAY, limits, move || pdf_text(&bytes)) {
        Ok(text) => bound(text, "pdf", false, limits),
        Err(failed) => failed,
    }
}

/// Runs a reader of crafted input (a third-party parser, or a walk of structures the
/// file controls) on a thread of its own within the time limit ([`bounded`]): its
/// value, or the `Failed` that says why there is none (`kind: …`).
fn read_bounded<T: Send + 'static>(
    kind: &str,
    runaway: &'static AtomicUsize,
    limits: Limits,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Extracted> {
    let failed = |reason: String| Err(Extracted::Failed(format!("{kind}: {reason}")));
    match bounded(runaway, MAX_RUNAWAY_READERS, limits.max_time, work) {
        Bounded::Done(Ok(Ok(value))) => Ok(value),
        Bounded::Done(Ok(Err(e))) => failed(e),
        Bounded::Done(Err(())) => failed("the parser failed on this file".into()),
        Bounded::TimedOut => failed(format!(
            "text extraction took longer than {:?}",
            limits.max_time
        )),
        Bounded::NotStarted(running) => failed(format!(
            "not read: {running} earlier documents are still being read past the {:?} limit",
            limits.max_time
        )),
        Bounded::NoThread(e) => failed(e),
    }
}

/// The text of a PDF (`pdf-extract`), after fonts with a predefined CMap coded by
/// Unicode or GBK are given a reading `pdf-extract` knows.
fn pdf_text(bytes: &[u8]) -> Result<String, String> {
    let mut doc = pdf_extract::Document::load_mem(bytes).map_err(|e| e.to_string())?;
    if doc.is_encrypted() {
        // Encrypted with an empty user password (permissions only): readable as is.
        doc.decrypt("").map_err(|e| format!("encrypted: {e}"))?;
    }
    if let Some(page) = page_tree_cycle(&doc) {
        // pdf-extract follows /Parent for inherited resources and would never return.
        return Err(format!(
            "the page tree loops back at object {} {}",
            page.0, page.1
        ));
    }
    if let Some(name) = predefined_cmaps_made_readable(&mut doc) {
        return Err(format!("a font's encoding {name} is not read"));
    }
    let mut text = String::new();
    pdf_extract::output_doc(&doc, &mut pdf_extract::PlainTextOutput::new(&mut text))
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// A page whose `/Parent` chain comes back to an object already on it.
fn page_tree_cycle(doc: &pdf_extract::Document) -> Option<pdf_extract::ObjectId> {
    let parent = |id| {
        doc.get_dictionary(id)
            .and_then(|d| d.get(b"Parent"))
            .and_then(pdf_extract::Object::as_reference)
            .ok()
    };
    for page in doc.get_pages().into_values() {
        let mut seen = std::collections::HashSet::from([page]);
        let mut at = page;
        while let Some(up) = parent(at) {
            if !seen.insert(up) {
                return Some(up);
            }
            at = up;
        }
    }
    None
}

/// Chinese PDFs written without embedded fonts (iText's `STSong-Light`, older office
/// exporters) use Adobe's predefined CMaps, which `pdf-extract` does not know (it
/// reads only `Identity-H`). Two families are rewritten into a reading it does know:
/// - `UniGB-UCS2-H`, `UniGB-UTF16-H` (and their CNS, JIS and KS kin): each character
///   code *is* its UTF-16 value. The font becomes `Identity-H` with a `ToUnicode` map
///   of every drawn code to itself.
/// - `GBK-EUC-H` and the rest of Adobe-GB1's EUC family (`GB-EUC`, `GBpc-EUC`,
///   `GBKp-EUC`, `GBK2K`): codes are GBK bytes, one byte up to 0x80, two from 0x81.
///   The font gets an embedded CMap with that code space (code = CID) and a
///   `ToUnicode` map of every drawn code to its GBK character (GBK2K's four-byte
///   codes, for characters beyond GBK, are not read).
///
/// Another predefined CMap (`B5pc-H` …) is returned by name: the PDF is then reported
/// unreadable, naming it.
fn predefined_cmaps_made_readable(doc: &mut pdf_extract::Document) -> Option<String> {
    use pdf_extract::{Object, Stream};
    let unicode_coded = |name: &[u8]| {
        let name = String::from_utf8_lossy(name);
        name.starts_with("Uni") && (name.contains("-UCS2-") || name.contains("-UTF16-"))
    };
    let gbk_coded = |name: &[u8]| {
        matches!(
            name,
            b"GB-EUC-H"
                | b"GB-EUC-V"
                | b"GBpc-EUC-H"
                | b"GBpc-EUC-V"
                | b"GBK-EUC-H"
                | b"GBK-EUC-V"
                | b"GBKp-EUC-H"
                | b"GBKp-EUC-V"
                | b"GBK2K-H"
                | b"GBK2K-V"
        )
    };
    let mut unicode_fonts = Vec::new();
    let mut gbk_fonts = Vec::new();
    let mut unread = None;
    for (id, object) in &doc.objects {
        let Ok(dict) = object.as_dict() else { continue };
        let is_type0 = dict.get(b"Subtype").and_then(Object::as_name).ok() == Some(b"Type0");
        let without_map = dict.get(b"ToUnicode").is_err();
        match dict.get(b"Encoding").and_then(Object::as_name) {
            Ok(name) if is_type0 && unicode_coded(name) => {
                let vertical = name.ends_with(b"-V");
                unicode_fonts.push((*id, vertical, without_map));
            }
            Ok(name) if is_type0 && gbk_coded(name) => gbk_fonts.push((*id, without_map)),
            Ok(b"Identity-H" | b"Identity-V") => {}
            Ok(name) if is_type0 => unread = Some(String::from_utf8_lossy(name).into_owned()),
            _ => {}
        }
    }
    if unicode_fonts.is_empty() && gbk_fonts.is_empty() {
        return unread;
    }
    // One map per family for all its fonts, of the codes the document draws (a map of
    // all 63 000 codes costs pdf-extract 10 ms to load per font).
    let strings = drawn_strings(doc);
    let mut add_map = |cmap: String| {
        doc.add_object(Stream::new(
            pdf_extract::Dictionary::new(),
            cmap.into_bytes(),
        ))
    };
    let unicode_map = unicode_fonts
        .iter()
        .any(|f| f.2)
        .then(|| add_map(identity_to_unicode(&two_byte_codes(&strings))));
    let gbk_map = gbk_fonts
        .iter()
        .any(|f| f.1)
        .then(|| add_map(gbk_to_unicode(&gbk_codes(&strings))));
    let gbk_encoding = (!gbk_fonts.is_empty()).then(|| add_map(GBK_CODES_AS_CIDS.to_string()));
    let mut set = |id, encoding: Object, map: Option<pdf_extract::ObjectId>| {
        if let Ok(Object::Dictionary(dict)) = doc.get_object_mut(id) {
            dict.set("Encoding", encoding);
            if let Some(map) = map {
                dict.set("ToUnicode", Object::Reference(map));
            }
        }
    };
    for (id, vertical, without_map) in unicode_fonts {
        let identity: &[u8] = if vertical {
            b"Identity-V"
        } else {
            b"Identity-H"
        };
        set(
            id,
            Object::Name(identity.to_vec()),
            unicode_map.filter(|_| without_map),
        );
    }
    if let Some(encoding) = gbk_encoding {
        for (id, without_map) in gbk_fonts {
            set(
                id,
                Object::Reference(encoding),
                gbk_map.filter(|_| without_map),
            );
        }
    }
    unread
}

/// The strings that the pages and forms of `doc` draw, as bytes (character codes).
fn drawn_strings(doc: &pdf_extract::Document) -> Vec<Vec<u8>> {
    use pdf_extract::Object;
    let mut streams: Vec<Vec<u8>> = doc
        .get_pages()
        .values()
        .filter_map(|page| doc.get_page_content(*page).ok())
        .collect();
    for object in doc.objects.values() {
        if let Object::Stream(stream) = object {
            if stream.dict.get(b"Subtype").and_then(Object::as_name).ok() == Some(b"Form") {
                streams.push(
                    stream
                        .decompressed_content()
                        .unwrap_or_else(|_| stream.content.clone()),
                );
            }
        }
    }
    let mut strings = Vec::new();
    for content in streams {
        let Ok(content) = pdf_extract::content::Content::decode(&content) else {
            continue;
        };
        for op in content.operations {
            for operand in op.operands {
                match operand {
                    Object::String(bytes, _) => strings.push(bytes),
                    Object::Array(items) => {
                        strings.extend(items.into_iter().filter_map(|item| match item {
                            Object::String(bytes, _) => Some(bytes),
                            _ => None,
                        }))
                    }
                    _ => {}
                }
            }
        }
    }
    strings
}

/// The drawn strings read as two-byte codes.
fn two_byte_codes(strings: &[Vec<u8>]) -> std::collections::BTreeSet<u16> {
    strings
        .iter()
        .flat_map(|s| s.chunks_exact(2).map(|p| u16::from_be_bytes([p[0], p[1]])))
        .collect()
}

/// The drawn strings read as GBK codes: a byte up to 0x80 alone, a lead byte from 0x81
/// with the byte after it.
fn gbk_codes(strings: &[Vec<u8>]) -> std::collections::BTreeSet<u16> {
    let mut codes = std::collections::BTreeSet::new();
    for s in strings {
        let mut bytes = s.iter().copied();
        while let Some(b) = bytes.next() {
            match b {
                0..=0x80 => {
                    codes.insert(u16::from(b));
                }
                0x81..=0xFE => {
                    if let Some(trail) = bytes.next() {
                        codes.insert(u16::from_be_bytes([b, trail]));
                    }
                }
                0xFF => {}
            }
        }
    }
    codes
}

/// An encoding CMap for GBK-coded fonts: one-byte codes to 0x80, two-byte codes from
/// 0x8140, each code its own CID. Written for the parser `pdf-extract` uses
/// (`adobe-cmap-parser` 0.4), which takes a code-space range's width in bytes as half
/// the length of its bounds and reads one `cidrange` entry correctly, not several:
/// so the bounds are zero-padded to twice their width (`<0000> <0080>` is one byte
/// wide, `<00008140> <0000FEFE>` two), and one entry maps every code to itself. The
/// GBK PDF test fails if a new version of the parser reads them otherwise.
const GBK_CODES_AS_CIDS: &str = "/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n\
     /CMapName /Weilan-GBK-EUC def /CMapType 1 def\n\
     2 begincodespacerange\n<0000> <0080>\n<00008140> <0000FEFE>\nendcodespacerange\n\
     1 begincidrange\n<0000> <FFFF> 0\nendcidrange\n\
     endcmap CMapName currentdict /CMap defineresource pop end end\n";

/// A `ToUnicode` CMap mapping each of the GBK `codes` to its character (codes that are
/// not GBK characters left out).
fn gbk_to_unicode(codes: &std::collections::BTreeSet<u16>) -> String {
    let pairs = codes.iter().filter_map(|&code| {
        let bytes = code.to_be_bytes();
        let (source, gbk) = if code <= 0x80 {
            (format!("{code:02X}"), &bytes[1..])
        } else {
            (format!("{code:04X}"), &bytes[..])
        };
        let text = encoding_rs::GBK.decode_without_bom_handling(gbk).0;
        let one_char = !text.contains('\u{FFFD}') && text.chars().count() == 1;
        one_char.then(|| (source, text.encode_utf16().collect()))
    });
    to_unicode_cmap(
        "Weilan-GBK-UCS",
        "2 begincodespacerange <00> <80> <8140> <FEFE>",
        pairs,
    )
}

/// A `ToUnicode` CMap mapping each of `codes` to the same UTF-16 value (surrogate
/// halves left out).
fn identity_to_unicode(codes: &std::collections::BTreeSet<u16>) -> String {
    let pairs = codes
        .iter()
        .filter(|c| !(0xD800..=0xDFFF).contains(*c))
        .map(|&c| (format!("{c:04X}"), vec![c]));
    to_unicode_cmap(
        "Weilan-Identity-UCS",
        "1 begincodespacerange <0000> <FFFF>",
        pairs,
    )
}

/// A `ToUnicode` CMap named `name` over `codespace` (the `begincodespacerange` line
/// without its end), mapping each source code (hex) to its UTF-16 units, in
/// `bfchar` blocks of at most 100 as the format requires.
fn to_unicode_cmap(
    name: &str,
    codespace: &str,
    pairs: impl Iterator<Item = (String, Vec<u16>)>,
) -> String {
    let lines: Vec<String> = pairs
        .map(|(source, units)| {
            let target: String = units.iter().map(|u| format!("{u:04X}")).collect();
            format!("<{source}> <{target}>\n")
        })
        .collect();
    let mut m = format!(
        "/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n\
         /CMapName /{name} def /CMapType 2 def\n{codespace} endcodespacerange\n"
    );
    for block in lines.chunks(100) {
        m.push_str(&format!(
            "{} beginbfchar\n{}endbfchar\n",
            block.len(),
            block.concat()
        ));
    }
    m.push_str("endcmap CMapName currentdict /CMap defineresource pop end end\n");
    m
}

/// Readers of one kind (PDF, OLE2, RTF: [`read_bounded`]) that may run on past their
/// time limit at once.
pub const MAX_RUNAWAY_READERS: usize = 2;

/// How a [`bounded`] piece of work went.
#[derive(Debug)]
pub enum Bounded<T> {
    /// Finished in time (`Err` if it panicked).
    Done(Result<T, ()>),
    /// Still running at the time limit: abandoned, it runs on.
    TimedOut,
    /// Not started: this many abandoned ones still run.
    NotStarted(usize),
    NoThread(String),
}

/// Runs `work` on a thread of its own and waits at most `max_time`. A thread that
/// finishes in time is joined; one abandoned past its limit runs on (it cannot be
/// interrupted), counted in `runaway` until it ends, and while `max_runaway` of them
/// run no new one is started — a user writing crafted documents must not be able to
/// pile up threads spinning in the agent.
pub fn bounded<T: Send + 'static>(
    runaway: &'static AtomicUsize,
    max_runaway: usize,
    max_time: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Bounded<T> {
    const RUNNING: u8 = 0;
    const FINISHED: u8 = 1;
    const ABANDONED: u8 = 2;
    let running = runaway.load(Ordering::SeqCst);
    if running >= max_runaway {
        return Bounded::NotStarted(running);
    }
    let state = Arc::new(AtomicU8::new(RUNNING));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread_state = state.clone();
    let spawned = std::thread::Builder::new()
        .name("extract".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            let _ = tx.send(r.map_err(|_| ()));
            if thread_state
                .compare_exchange(RUNNING, FINISHED, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                runaway.fetch_sub(1, Ordering::SeqCst);
            }
        });
    let handle = match spawned {
        Ok(h) => h,
        Err(e) => return Bounded::NoThread(e.to_string()),
    };
    match rx.recv_timeout(max_time) {
        Ok(r) => {
            let _ = handle.join();
            Bounded::Done(r)
        }
        Err(_) => {
            runaway.fetch_add(1, Ordering::SeqCst);
            if state
                .compare_exchange(RUNNING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                // It finished just now after all: not a runaway.
                runaway.fetch_sub(1, Ordering::SeqCst);
            }
            Bounded::TimedOut
        }
    }
}

/// Decodes plain text: UTF-16 (by its byte-order mark, or by the zero bytes of
/// mostly-ASCII UTF-16), UTF-8, GB18030, then UTF-16 without a mark; a few NUL bytes
/// or invalid sequences in real text (a stray byte, a damaged sector) are tolerated —
/// at most one in a hundred. Anything else is binary.
pub fn plain(bytes: &[u8], truncated: bool, limits: Limits) -> Extracted {
    if let Some((text, format)) = utf16_marked(bytes) {
        return bound(text, format, truncated, limits);
    }
    let sample = &bytes[..bytes.len().min(8192)];
    let nul = sample.iter().filter(|b| **b == 0).count();
    // At most one bad unit in a hundred (and a few in any short file).
    let noisy = |bad: usize, of: usize| bad > (of / 100).max(4);
    let squeezed;
    let bytes = if nul == 0 {
        bytes
    } else if noisy(nul, sample.len()) {
        return match utf16_unmarked(bytes) {
            Some((text, format)) => bound(text, format, truncated, limits),
            None => Extracted::Unsupported("binary"),
        };
    } else {
        squeezed = squeeze_zeros(bytes);
        &squeezed
    };
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // A cut may split a multi-byte character: an invalid tail of < 4 bytes is the cut.
    let body = match std::str::from_utf8(body) {
        Err(e) if truncated && body.len() - e.valid_up_to() < 4 => &body[..e.valid_up_to()],
        _ => body,
    };
    let utf8 = String::from_utf8_lossy(body);
    if plausible(&utf8) {
        return bound(utf8.into_owned(), "utf-8", truncated, limits);
    }
    let (gb, _, _) = encoding_rs::GB18030.decode(body);
    if plausible(&gb) && common_hanzi(body) {
        return bound(gb.into_owned(), "gb18030", truncated, limits);
    }
    // UTF-16 without a mark and without zero bytes: Chinese text (its code units have
    // no zero byte).
    if nul == 0 {
        if let Some((text, format)) = utf16_unmarked(bytes) {
            return bound(text, format, truncated, limits);
        }
    }
    Extracted::Unsupported("binary")
}

/// UTF-16 without a byte-order mark, as some exporters write it: the text must read
/// as Chinese or ASCII, which random bytes (and binary files' runs of zeros) do not.
/// With ASCII in it (digits, Latin letters), its zero bytes are mostly on one side of
/// the code units, which tells the byte order to try first.
fn utf16_unmarked(bytes: &[u8]) -> Option<(String, &'static str)> {
    if bytes.len() < 16 || bytes.len() % 2 == 1 {
        return None;
    }
    let sample = &bytes[..bytes.len().min(8192)];
    let zeros_at = |parity: usize| {
        sample
            .iter()
            .enumerate()
            .filter(|(i, b)| **b == 0 && i % 2 == parity)
            .count()
    };
    let mut orders = [
        (encoding_rs::UTF_16LE, "utf-16le"),
        (encoding_rs::UTF_16BE, "utf-16be"),
    ];
    if zeros_at(0) > zeros_at(1) {
        orders.reverse();
    }
    for (encoding, format) in orders {
        let (text, _) = encoding.decode_without_bom_handling(bytes);
        if plausible(&text) && chinese_or_ascii(&text) {
            return Some((text.into_owned(), format));
        }
    }
    None
}

/// Whether nine in ten characters are CJK ideographs, CJK or full-width punctuation,
/// or printable ASCII.
fn chinese_or_ascii(text: &str) -> bool {
    let (mut total, mut known) = (0usize, 0usize);
    for c in text.chars() {
        total += 1;
        if c.is_ascii_graphic()
            || c.is_ascii_whitespace()
            || ('\u{4E00}'..='\u{9FFF}').contains(&c)
            || ('\u{3000}'..='\u{303F}').contains(&c)
            || ('\u{FF00}'..='\u{FFEF}').contains(&c)
        {
            known += 1;
        }
    }
    known * 10 >= total * 9
}

/// Whether the double-byte characters of GB-encoded `bytes` are mostly in GB 2312's
/// rows of punctuation and common characters (real Chinese text: nearly all of them;
/// random or compressed bytes: about half).
fn common_hanzi(bytes: &[u8]) -> bool {
    let (mut total, mut common, mut i) = (0usize, 0usize, 0usize);
    while i + 1 < bytes.len() {
        let (lead, trail) = (bytes[i], bytes[i + 1]);
        if lead < 0x81 {
            i += 1;
            continue;
        }
        total += 1;
        if (0xA1..=0xF7).contains(&lead) && (0xA1..=0xFE).contains(&trail) {
            common += 1;
        }
        // Four-byte GB18030 sequences have a digit as their second byte.
        i += if trail.is_ascii_digit() { 4 } else { 2 };
    }
    total < 10 || common * 100 >= total * 80
}

/// UTF-16 with a byte-order mark, or without one when every other byte is zero (text
/// in Latin script: Windows tools write it).
fn utf16_marked(bytes: &[u8]) -> Option<(String, &'static str)> {
    let (encoding, format, body) = if let Some(b) = bytes.strip_prefix(b"\xFF\xFE") {
        (encoding_rs::UTF_16LE, "utf-16le", b)
    } else if let Some(b) = bytes.strip_prefix(b"\xFE\xFF") {
        (encoding_rs::UTF_16BE, "utf-16be", b)
    } else {
        let sample = &bytes[..bytes.len().min(8192) & !1];
        let zeros = |offset: usize| {
            sample
                .iter()
                .skip(offset)
                .step_by(2)
                .filter(|b| **b == 0)
                .count()
        };
        let half = sample.len() / 2;
        if half < 2 {
            return None;
        }
        let (even, odd) = (zeros(0), zeros(1));
        if odd * 10 >= half * 4 && even * 20 < half {
            (encoding_rs::UTF_16LE, "utf-16le", bytes)
        } else if even * 10 >= half * 4 && odd * 20 < half {
            (encoding_rs::UTF_16BE, "utf-16be", bytes)
        } else {
            return None;
        }
    };
    let (text, _) = encoding.decode_without_bom_handling(body);
    plausible(&text).then(|| (text.into_owned(), format))
}

/// Whether decoded text reads as text: nearly every character printable or white
/// space; at most one in a hundred (or four in a short text) a replacement, control
/// or private-use character.
fn plausible(text: &str) -> bool {
    let mut total = 0usize;
    let mut odd = 0usize;
    for c in text.chars() {
        total += 1;
        if c == char::REPLACEMENT_CHARACTER
            || (c.is_control() && !c.is_whitespace())
            || ('\u{E000}'..='\u{F8FF}').contains(&c)
        {
            odd += 1;
        }
    }
    total > 0 && odd <= (total / 100).max(4).min(total / 4)
}

fn bound(text: String, format: &'static str, truncated: bool, limits: Limits) -> Extracted {
    if text.chars().count() > limits.max_chars {
        return Extracted::Text {
            text: text.chars().take(limits.max_chars).collect(),
            format,
            truncated: true,
            unread: None,
        };
    }
    Extracted::Text {
        text,
        format,
        truncated,
        unread: None,
    }
}

/// docx / xlsx / pptx: the text runs of their XML parts.
fn office<R: Read + std::io::Seek>(file: R, limits: Limits, depth: usize) -> Extracted {
    let started = Instant::now();
    let mut zip = match zip::ZipArchive::new(file) {
        Ok(z) => z,
        Err(e) => return Extracted::Failed(format!("not a readable zip: {e}")),
    };
    let names: Vec<String> = zip
        .file_names()
        .filter_map(Result::ok)
        .map(|n| n.into_owned())
        .collect();
    let (format, parts, spec): (&'static str, Vec<String>, &XmlText) =
        if names.iter().any(|n| n == "word/document.xml") {
            let mut p: Vec<String> = names
                .iter()
                .filter(|n| {
                    n.starts_with("word/")
                        && n.ends_with(".xml")
                        && (n.contains("document") || n.contains("header") || n.contains("footer"))
                })
                .cloned()
                .collect();
            // Page headers first: a mark in the header is a document's first line.
            p.sort_by_key(|n| (!n.contains("header"), n.contains("footer"), natural_key(n)));
            ("docx", p, &PARAGRAPHS)
        } else if names.iter().any(|n| n == "xl/workbook.xml") {
            let mut p: Vec<String> = names
                .iter()
                .filter(|n| {
                    n == &"xl/sharedStrings.xml"
                        || (n.starts_with("xl/worksheets/") && n.ends_with(".xml"))
                })
                .cloned()
                .collect();
            p.sort();
            ("xlsx", p, &CELLS)
        } else if names.iter().any(|n| n.starts_with("ppt/slides/")) {
            let mut p: Vec<String> = names
                .iter()
                .filter(|n| n.starts_with("ppt/slides/") && n.ends_with(".xml"))
                .cloned()
                .collect();
            p.sort();
            ("pptx", p, &PARAGRAPHS)
        } else if names.iter().any(|n| n == "OFD.xml") {
            // GB/T 33190: each page's content, pages in their number order.
            let mut p: Vec<String> = names
                .iter()
                .filter(|n| n.contains("/Pages/") && n.ends_with("/Content.xml"))
                .cloned()
                .collect();
            p.sort_by_key(|n| natural_key(n));
            ("ofd", p, &OFD_TEXT)
        } else {
            return archive(zip, limits, depth, started);
        };
    let mut text = String::new();
    let mut budget = limits.max_bytes;
    let mut truncated = false;
    for name in parts {
        if started.elapsed() > limits.max_time || budget == 0 {
            truncated = true;
            break;
        }
        let mut xml = Vec::new();
        let entry = match zip.by_name(&name) {
            Ok(e) => e,
            Err(e) => return Extracted::Failed(format!("{name}: {e}")),
        };
        // Read one byte more than the budget to know whether it was exceeded.
        if let Err(e) = entry.take(budget + 1).read_to_end(&mut xml) {
            return Extracted::Failed(format!("{name}: {e}"));
        }
        if xml.len() as u64 > budget {
            xml.truncate(budget as usize);
            truncated = true;
        }
        budget -= xml.len() as u64;
        xml_text(&xml, spec, &mut text);
        if text.chars().count() > limits.max_chars {
            break;
        }
    }
    bound(text, format, truncated, limits)
}

/// Where an office format keeps its text: the elements holding text, and the elements
/// that end a line (a paragraph, a shared string, a cell) — the runs inside one are
/// joined, so a mark or a number that Word split across runs (`机` `密★`) reads whole.
struct XmlText {
    text: &'static [&'static str],
    lines: &'static [&'static str],
}

/// docx (`w:t` in `w:p`) and pptx (`a:t` in `a:p`).
const PARAGRAPHS: XmlText = XmlText {
    text: &["t"],
    lines: &["p"],
};
/// xlsx: shared strings (`t` in `si`), and in worksheets inline strings and the values
/// of cells (`v` in `c`: numbers typed into cells) — not the shared-string indexes.
const CELLS: XmlText = XmlText {
    text: &["t", "v"],
    lines: &["si", "c"],
};

/// Archives nested deeper than this are not opened (refused as unreadable).
const MAX_ARCHIVE_DEPTH: usize = 3;
/// Most entries read from one archive; the rest make the text a prefix.
pub(super) const MAX_ARCHIVE_ENTRIES: usize = 10_000;
/// An entry that inflates to more than this many times its compressed size (and to
/// more than 1 MiB) is a zip bomb: the archive is refused, and says why.
pub(super) const MAX_INFLATION_RATIO: u64 = 200;

/// What one archive's entries gave so far, within one budget of inflated bytes and
/// time that its nested archives share; each entry's text is separated by a form feed
/// line (a new document for the detectors), unreadable entries are named.
struct Unpacked {
    text: String,
    budget: u64,
    truncated: bool,
    unread: Vec<String>,
    limits: Limits,
    depth: usize,
    started: Instant,
}

impl Unpacked {
    fn new(limits: Limits, depth: usize, started: Instant) -> Unpacked {
        Unpacked {
            text: String::new(),
            budget: limits.max_bytes,
            truncated: false,
            unread: Vec::new(),
            limits,
            depth,
            started,
        }
    }

    /// Whether budget, time and room for text are left for another entry.
    fn room(&mut self) -> bool {
        let full = self.started.elapsed() > self.limits.max_time
            || self.budget == 0
            || self.text.chars().count() > self.limits.max_chars;
        self.truncated |= full;
        !full
    }

    /// Reads one entry (at most the budget) and extracts it as a file of its own.
    /// `packed`: its compressed size, when the container compresses entry by entry.
    /// `Err`: a compression bomb, which refuses the whole archive.
    fn entry(&mut self, name: &str, packed: Option<u64>, reader: impl Read) -> Result<(), String> {
        let mut bytes = Vec::new();
        if let Err(e) = reader.take(self.budget + 1).read_to_end(&mut bytes) {
            self.unread.push(format!("{name}: {e}"));
            return Ok(());
        }
        let inflated = bytes.len() as u64;
        if let Some(packed) = packed.map(|p| p.max(1)) {
            if inflated > 1 << 20 && inflated > packed * MAX_INFLATION_RATIO {
                return Err(format!(
                    "zip bomb refused: {name} inflates {packed} bytes to more than {inflated}"
                ));
            }
        }
        if inflated > self.budget {
            bytes.truncate(self.budget as usize);
            self.truncated = true;
        }
        self.budget -= bytes.len() as u64;
        // A nested archive inflates within what is left of this one's budget (so the
        // whole file inflates at most MAX_ARCHIVE_DEPTH budgets), and the time left.
        let inner = Limits {
            max_bytes: self.budget.max(bytes.len() as u64),
            max_time: self.limits.max_time.saturating_sub(self.started.elapsed()),
            ..self.limits
        };
        match extract_bytes(bytes, inner, self.depth + 1) {
            Extracted::Text {
                text,
                truncated,
                unread,
                ..
            } => {
                if !self.text.is_empty() {
                    self.text.push_str("\n\u{c}\n");
                }
                self.text.push_str(&text);
                self.truncated |= truncated;
                self.unread.extend(unread.map(|u| format!("{name}: {u}")));
            }
            Extracted::Unsupported(kind) => self.unread.push(format!("{name}: {kind}")),
            Extracted::Failed(e) if e.contains("bomb refused") => return Err(e),
            Extracted::Failed(e) => self.unread.push(format!("{name}: {e}")),
        }
        Ok(())
    }

    fn finish(self, format: &'static str) -> Extracted {
        if self.text.is_empty() && !self.unread.is_empty() {
            return Extracted::Failed(format!(
                "no entry could be read: {}",
                self.unread.join("; ")
            ));
        }
        let unread = (!self.unread.is_empty()).then(|| self.unread.join("; "));
        let mut read = bound(self.text, format, self.truncated, self.limits);
        if let Extracted::Text { unread: named, .. } = &mut read {
            *named = unread;
        }
        read
    }
}

fn too_deep(depth: usize) -> Option<Extracted> {
    (depth >= MAX_ARCHIVE_DEPTH)
        .then(|| Extracted::Failed(format!("archive nested more than {MAX_ARCHIVE_DEPTH} deep")))
}

/// A zip archive that is no office document: each entry extracted as a file of its
/// own (nested archives too, [`MAX_ARCHIVE_DEPTH`] deep), within the one budget of
/// inflated bytes and time. Encrypted or unreadable entries are named in `unread`.
fn archive<R: Read + std::io::Seek>(
    mut zip: zip::ZipArchive<R>,
    limits: Limits,
    depth: usize,
    started: Instant,
) -> Extracted {
    if let Some(refused) = too_deep(depth) {
        return refused;
    }
    let mut out = Unpacked::new(limits, depth, started);
    out.truncated = zip.len() > MAX_ARCHIVE_ENTRIES;
    for i in 0..zip.len().min(MAX_ARCHIVE_ENTRIES) {
        if !out.room() {
            break;
        }
        let entry = match zip.by_index(i) {
            Ok(e) => e,
            Err(e) => {
                out.unread.push(format!("entry {i}: {e}"));
                continue;
            }
        };
        if entry.is_dir() {
            continue;
        }
        let name = entry
            .name()
            .map_or_else(|_| format!("entry {i}"), |n| n.into_owned());
        let packed = entry.compressed_size();
        if let Err(bomb) = out.entry(&name, Some(packed), entry) {
            return Extracted::Failed(bomb);
        }
    }
    out.finish("zip")
}

/// A tar archive: each regular file extracted as a file of its own, like a zip's
/// entries (tar does not compress; a `.tar.gz` is bounded by its gzip layer).
fn tar_archive(bytes: &[u8], limits: Limits, depth: usize) -> Extracted {
    if let Some(refused) = too_deep(depth) {
        return refused;
    }
    let mut out = Unpacked::new(limits, depth, Instant::now());
    let mut tar = tar::Archive::new(bytes);
    let entries = match tar.entries() {
        Ok(e) => e,
        Err(e) => return Extracted::Failed(format!("not a readable tar: {e}")),
    };
    for (i, entry) in entries.enumerate() {
        if i >= MAX_ARCHIVE_ENTRIES {
            out.truncated = true;
            break;
        }
        if !out.room() {
            break;
        }
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // A damaged header ends the walk: what follows cannot be found.
                out.unread.push(format!("entry {i}: {e}"));
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_or_else(|_| format!("entry {i}"), |p| p.display().to_string());
        if let Err(bomb) = out.entry(&name, None, entry) {
            return Extracted::Failed(bomb);
        }
    }
    out.finish("tar")
}

/// A gzip stream (`.gz`, `.tar.gz`): inflated within the budget, refused as a bomb
/// past [`MAX_INFLATION_RATIO`], and its contents extracted as a file would be.
fn gzip(bytes: &[u8], limits: Limits, depth: usize) -> Extracted {
    if let Some(refused) = too_deep(depth) {
        return refused;
    }
    let packed = bytes.len().max(1) as u64;
    let mut inflated = Vec::new();
    let read = flate2::read::MultiGzDecoder::new(bytes)
        .take(limits.max_bytes + 1)
        .read_to_end(&mut inflated);
    // A stream cut short (a file over the read limit) still gives what it held.
    let cut = match read {
        Ok(_) => false,
        Err(e) if inflated.is_empty() => {
            return Extracted::Failed(format!("not a readable gzip: {e}"))
        }
        Err(_) => true,
    };
    let size = inflated.len() as u64;
    if size > 1 << 20 && size > packed * MAX_INFLATION_RATIO {
        return Extracted::Failed(format!(
            "gzip bomb refused: {packed} bytes inflate to more than {size}"
        ));
    }
    let over = size > limits.max_bytes;
    inflated.truncate(limits.max_bytes as usize);
    match extract_bytes(inflated, limits, depth + 1) {
        Extracted::Text {
            text,
            format,
            truncated,
            unread,
        } => Extracted::Text {
            text,
            format,
            truncated: truncated || over || cut,
            unread,
        },
        other => other,
    }
}

/// The POSIX tar magic (`ustar`) at its place in the first header.
fn is_tar(bytes: &[u8]) -> bool {
    bytes.get(257..262) == Some(b"ustar")
}

/// An archive entry's bytes, extracted as a file with these contents would be.
fn extract_bytes(bytes: Vec<u8>, limits: Limits, depth: usize) -> Extracted {
    if bytes.starts_with(b"PK\x03\x04") {
        return office(std::io::Cursor::new(bytes), limits, depth);
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return gzip(&bytes, limits, depth);
    }
    if is_tar(&bytes) {
        return tar_archive(&bytes, limits, depth);
    }
    if bytes.starts_with(b"%PDF") {
        return pdf(bytes, limits);
    }
    if is_7z(&bytes) {
        return seven_zip(&bytes, limits, depth);
    }
    if bytes.starts_with(&OLE2_MAGIC) {
        return compound(std::io::Cursor::new(bytes), limits);
    }
    if bytes.starts_with(b"{\\rtf") {
        let size = bytes.len() as u64;
        return rtf(std::io::Cursor::new(bytes), size, limits);
    }
    if let Some(kind) = unread_archive(&bytes) {
        return Extracted::Unsupported(kind);
    }
    plain(&bytes, false, limits)
}

/// Archive formats this version does not open, named so that the `unreadable` reason
/// says which (`unsupported: rar`) rather than `binary`. RAR is not opened: its
/// format is proprietary, and the one maintained decoder (`unrar`) binds a C library
/// under a licence that forbids re-creating the compressor.
fn unread_archive(head: &[u8]) -> Option<&'static str> {
    head.starts_with(b"Rar!\x1A\x07").then_some("rar")
}

/// The 7z signature.
fn is_7z(bytes: &[u8]) -> bool {
    bytes.starts_with(b"7z\xBC\xAF\x27\x1C")
}

/// A 7z archive: decompressed in a memory-capped child process ([`super::sevenz`]),
/// each entry then extracted here as a zip's entries are, in the same budget.
fn seven_zip(bytes: &[u8], limits: Limits, depth: usize) -> Extracted {
    use super::sevenz::Frame;
    if let Some(refused) = too_deep(depth) {
        return refused;
    }
    let started = Instant::now();
    let frames = match super::sevenz::unpack(bytes, limits) {
        Ok(frames) => frames,
        Err(why) => return Extracted::Failed(format!("7z: {why}")),
    };
    let mut out = Unpacked::new(limits, depth, started);
    for frame in frames {
        match frame {
            Frame::Entry { name, data } => {
                if !out.room() {
                    break;
                }
                if let Err(bomb) = out.entry(&name, None, &data[..]) {
                    return Extracted::Failed(bomb);
                }
            }
            Frame::Unread { name, reason } => out.unread.push(format!("{name}: {reason}")),
            Frame::More => out.truncated = true,
            Frame::Bomb(why) => return Extracted::Failed(why),
            Frame::Fatal(why) => return Extracted::Failed(format!("7z: {why}")),
        }
    }
    out.finish("7z")
}

/// RTF read at most this far: the parser holds a token per control word, about ten
/// times the bytes it reads.
const MAX_RTF_BYTES: u64 = 8 * 1024 * 1024;

/// Rich Text Format (`rtf-parser-tt`: groups, `\uN`, and `\'hh` bytes in the code page
/// the document declares — GBK for `\ansicpg936`), page headers first, hidden text
/// (`\v`) included: text hidden from the reader is still in the file.
fn rtf<R: Read + Send + 'static>(file: R, size: u64, limits: Limits) -> Extracted {
    static RUNAWAY: AtomicUsize = AtomicUsize::new(0);
    let cap = limits.max_bytes.min(MAX_RTF_BYTES);
    let read = read_bounded("rtf", &RUNAWAY, limits, move || {
        let mut bytes = Vec::new();
        file.take(cap)
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?;
        let doc = rtf_parser_tt::RtfDocument::from_bytes(&bytes).map_err(|e| e.to_string())?;
        let part = |header: bool| -> String {
            doc.body
                .iter()
                .filter(|b| (b.part == rtf_parser_tt::Part::Header) == header)
                .map(|b| b.text.as_str())
                .collect()
        };
        Ok(format!("{}\n{}", part(true), part(false)))
    });
    match read {
        Ok(text) => bound(text, "rtf", size > cap, limits),
        Err(failed) => failed,
    }
}

/// The signature of OLE2 compound files (.doc, .xls, .ppt, .wps, .et, .dps).
const OLE2_MAGIC: [u8; 8] = [0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];

/// A legacy binary office document ([`super::ole`]), read on a thread of its own
/// within the time limit (the readers walk structures a crafted file controls).
fn compound<R: Read + std::io::Seek + Send + 'static>(file: R, limits: Limits) -> Extracted {
    static RUNAWAY: AtomicUsize = AtomicUsize::new(0);
    let read = read_bounded("ole2", &RUNAWAY, limits, move || {
        super::ole::extract(file, limits.max_bytes)
    });
    match read {
        Ok(super::ole::OleText::Text { text, format }) => bound(text, format, false, limits),
        Ok(super::ole::OleText::Encrypted(format)) => {
            Extracted::Failed(format!("{format}: encrypted (password-protected)"))
        }
        Ok(super::ole::OleText::Unknown) => Extracted::Unsupported("ole2"),
        Err(failed) => failed,
    }
}

/// OFD (GB/T 33190, Chinese government documents and e-invoices): `ofd:TextCode`
/// runs, a line per `ofd:TextObject`.
const OFD_TEXT: XmlText = XmlText {
    text: &["TextCode"],
    lines: &["TextObject"],
};

/// `Doc_0/Pages/Page_10/Content.xml` after `Page_9`: runs of digits compare as numbers.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let text_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (text, tail) = rest.split_at(text_len);
        let digits_len = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (digits, tail) = tail.split_at(digits_len);
        key.push((text.to_string(), digits.parse().unwrap_or(u64::MAX)));
        rest = tail;
    }
    key
}

/// Appends the text of `xml` as `spec` says, a line per paragraph, shared string or
/// cell; character and entity references resolved; a tab or break inside a paragraph
/// is a space. Malformed XML ends the part (what was read is kept).
fn xml_text(xml: &[u8], spec: &XmlText, out: &mut String) {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut inside = false;
    // xlsx: the current cell holds an index into the shared strings, not a value.
    let mut shared_string_cell = false;
    let mut buf = Vec::new();
    let end_line = |out: &mut String| {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
    };
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => {
                let name = e.local_name();
                let name: &str = name.into_inner();
                if name == "c" {
                    shared_string_cell = e
                        .attributes()
                        .flatten()
                        .any(|a| a.key.local_name().into_inner() == "t" && &*a.value == "s");
                }
                inside = spec.text.contains(&name) && !(name == "v" && shared_string_cell);
            }
            Ok(Event::Empty(e)) => {
                if matches!(e.local_name().into_inner(), "tab" | "br" | "cr") {
                    out.push(' ');
                }
            }
            Ok(Event::End(e)) => {
                inside = false;
                if spec.lines.contains(&e.local_name().into_inner()) {
                    end_line(out);
                }
            }
            Ok(Event::Text(t)) if inside => out.push_str(&t.xml10_content()),
            Ok(Event::CData(t)) if inside => out.push_str(&t.into_inner()),
            Ok(Event::GeneralRef(r)) if inside => {
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    out.push(c);
                } else {
                    out.push_str(match r.as_ref() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => "",
                    });
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
        buf.clear();
    }
    end_line(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::samples;

    #[test]
    fn work_past_its_time_limit_runs_on_but_at_most_two_at_once() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::mpsc;
        static RUNAWAY: AtomicUsize = AtomicUsize::new(0);
        // Three pieces of work that end only when the test says so.
        let mut release = Vec::new();
        let mut results = Vec::new();
        for _ in 0..3 {
            let (go, wait) = mpsc::channel::<()>();
            release.push(go);
            results.push(bounded(&RUNAWAY, 2, Duration::from_millis(1), move || {
                let _ = wait.recv();
                7
            }));
        }
        assert!(matches!(results[0], Bounded::TimedOut), "{results:?}");
        assert!(matches!(results[1], Bounded::TimedOut), "{results:?}");
        assert!(matches!(results[2], Bounded::NotStarted(2)), "{results:?}");
        // Once the abandoned ones end, work starts again; a finished one is joined
        // and counted nowhere.
        drop(release);
        while RUNAWAY.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        let done = bounded(&RUNAWAY, 2, Duration::from_secs(60), || 7);
        assert!(matches!(done, Bounded::Done(Ok(7))), "{done:?}");
        let panicked = bounded(&RUNAWAY, 2, Duration::from_secs(60), || -> u8 {
            panic!("parser")
        });
        assert!(matches!(panicked, Bounded::Done(Err(()))), "{panicked:?}");
        assert_eq!(RUNAWAY.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
    use std::io::Write;

    fn office_file(dir: &Path, name: &str, parts: &[(&str, &str)]) -> std::path::PathBuf {
        let path = dir.join(name);
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (n, body) in parts {
            z.start_file(*n, opts).unwrap();
            z.write_all(body.as_bytes()).unwrap();
        }
        z.finish().unwrap();
        path
    }

    fn text_of(e: Extracted) -> (String, &'static str, bool) {
        let (text, format, truncated, _) = read_whole(e);
        (text, format, truncated)
    }

    /// Text, format, whether truncated, and the parts left unread.
    fn read_whole(e: Extracted) -> (String, &'static str, bool, Option<String>) {
        match e {
            Extracted::Text {
                text,
                format,
                truncated,
                unread,
            } => (text, format, truncated, unread),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn archives_are_read_entry_by_entry_nested_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let inner = samples::zip(&[(
            "工资表.csv",
            "姓名,身份证\n张三,11010519491231002X\n".as_bytes(),
        )]);
        let docx = std::fs::read(office_file(
            dir.path(),
            "a.docx",
            &[("word/document.xml", r#"<w:document xmlns:w="x"><w:body><w:p><w:r><w:t>秘密</w:t></w:r></w:p></w:body></w:document>"#)],
        ))
        .unwrap();
        let outer = samples::zip(&[
            ("readme.txt", "月度报表\n".as_bytes()),
            ("2026/inner.zip", &inner),
            ("2026/通知.docx", &docx),
            ("logo.bin", &[0u8, 1, 2, 3, 0, 0, 0, 0, 9, 0, 0, 0]),
        ]);
        let path = dir.path().join("outer.zip");
        std::fs::write(&path, &outer).unwrap();
        let (text, format, truncated, unread) = read_whole(extract(&path, Limits::default()));
        assert_eq!((format, truncated), ("zip", false));
        assert!(
            text.contains("11010519491231002X") && text.contains("月度报表"),
            "{text}"
        );
        assert_eq!(unread.as_deref(), Some("logo.bin: binary"));
        // Each entry is a document of its own: the docx's lone 秘密 is its head.
        let marks = crate::classify::detectors::classification_marks(&text);
        assert_eq!(marks.len(), 1, "{marks:?}");
        assert_eq!(marks[0].detector, "mark:confidential");
        // The unread entry makes the file partly unreadable, for rules to act on.
        let (found, note) = crate::classify::Classifier::default()
            .classify_file(std::fs::File::open(&path).unwrap());
        assert!(found.iter().any(|f| f.detector == "prc-resident-id"));
        assert!(
            found
                .iter()
                .any(|f| f.detector == crate::classify::UNREADABLE
                    && f.samples[0] == "partly unread: logo.bin: binary"),
            "{found:?}"
        );
        assert_eq!(note.as_deref(), Some("partly unread: logo.bin: binary"));

        // A zip bomb: 64 MiB of zeros deflate to ~64 KiB.
        let bomb = samples::zip(&[("zeros.txt", &vec![0u8; 64 << 20])]);
        std::fs::write(
            dir.path().join("bomb.zip"),
            samples::zip(&[("a.zip", &bomb)]),
        )
        .unwrap();
        match extract(&dir.path().join("bomb.zip"), Limits::default()) {
            Extracted::Failed(e) => assert!(e.starts_with("zip bomb refused: zeros.txt"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Nested past the depth bound.
        let mut nested = samples::zip(&[("deep.txt", "机密★\n".as_bytes())]);
        for level in 0..MAX_ARCHIVE_DEPTH {
            nested = samples::zip(&[(&format!("level{level}.zip"), &nested)]);
        }
        std::fs::write(dir.path().join("deep.zip"), &nested).unwrap();
        match extract(&dir.path().join("deep.zip"), Limits::default()) {
            Extracted::Failed(e) => assert!(e.contains("nested more than 3 deep"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tar_and_gzip_are_read_entry_by_entry_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let inner = samples::zip(&[("名单.txt", "联系人 13912345678\n".as_bytes())]);
        let tgz = samples::gzip(
            &samples::tar(&[
                (
                    "报表/工资表.csv",
                    "姓名,身份证\n张三,11010519491231002X\n".as_bytes(),
                ),
                ("报表/inner.zip", &inner),
                ("报表/logo.bin", &[0u8, 1, 2, 3, 0, 0, 0, 0, 9, 0, 0, 0]),
            ]),
            false,
        );
        std::fs::write(dir.path().join("a.tar.gz"), &tgz).unwrap();
        let (text, format, truncated, unread) =
            read_whole(extract(&dir.path().join("a.tar.gz"), Limits::default()));
        assert_eq!((format, truncated), ("tar", false));
        assert!(
            text.contains("11010519491231002X") && text.contains("13912345678"),
            "{text}"
        );
        assert_eq!(unread.as_deref(), Some("报表/logo.bin: binary"));
        // A lone gzip'd text file reads as the text.
        std::fs::write(
            dir.path().join("n.txt.gz"),
            samples::gzip("机密★启用前\n".as_bytes(), false),
        )
        .unwrap();
        let (text, format, _) = text_of(extract(&dir.path().join("n.txt.gz"), Limits::default()));
        assert_eq!((text.trim(), format), ("机密★启用前", "utf-8"));
        // A gzip bomb: 64 MiB of zeros in ~64 KiB.
        std::fs::write(
            dir.path().join("bomb.gz"),
            samples::gzip(&vec![0u8; 64 << 20], false),
        )
        .unwrap();
        match extract(&dir.path().join("bomb.gz"), Limits::default()) {
            Extracted::Failed(e) => assert!(e.starts_with("gzip bomb refused"), "{e}"),
            other => panic!("{other:?}"),
        }
        // 10 000 archives deep (a tar in a zip in 9 998 gzip layers, stored so the
        // test builds it fast): refused at the depth bound, not unpacked 10 000 times.
        let mut nested = samples::tar(&[("x", "机密★\n".as_bytes())]);
        nested = samples::zip(&[("x.tar", &nested)]);
        for _ in 2..10_000 {
            nested = samples::gzip(&nested, true);
        }
        std::fs::write(dir.path().join("deep"), &nested).unwrap();
        match extract(&dir.path().join("deep"), Limits::default()) {
            Extracted::Failed(e) => assert!(e.contains("nested more than 3 deep"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ofd_pages_are_read_in_page_order() {
        let dir = tempfile::tempdir().unwrap();
        let page = |text: &str| {
            format!(
                r#"<ofd:Page xmlns:ofd="http://www.ofdspec.org/2016"><ofd:Content><ofd:Layer><ofd:TextObject ID="1"><ofd:TextCode X="0" Y="0">{text}</ofd:TextCode></ofd:TextObject><ofd:TextObject ID="2"><ofd:TextCode X="0" Y="9">第</ofd:TextCode><ofd:TextCode X="9" Y="9">二行</ofd:TextCode></ofd:TextObject></ofd:Layer></ofd:Content></ofd:Page>"#
            )
        };
        let (p0, p2, p10) = (page("机密★1年"), page("二"), page("十"));
        let ofd = office_file(
            dir.path(),
            "invoice.ofd",
            &[
                (
                    "OFD.xml",
                    r#"<ofd:OFD xmlns:ofd="http://www.ofdspec.org/2016"/>"#,
                ),
                ("Doc_0/Pages/Page_10/Content.xml", &p10),
                ("Doc_0/Pages/Page_0/Content.xml", &p0),
                ("Doc_0/Pages/Page_2/Content.xml", &p2),
            ],
        );
        let (t, f, _) = text_of(extract(&ofd, Limits::default()));
        assert_eq!(f, "ofd");
        assert_eq!(t, "机密★1年\n第二行\n二\n第二行\n十\n第二行\n");
    }

    #[test]
    fn runs_join_per_paragraph_and_numeric_cells_are_read() {
        let dir = tempfile::tempdir().unwrap();
        // Word splits text into runs wherever formatting or editing history changes.
        let docx = office_file(
            dir.path(),
            "split.docx",
            &[(
                "word/document.xml",
                r#"<w:document xmlns:w="x"><w:body><w:p><w:r><w:t>机</w:t></w:r><w:r><w:rPr><w:b/></w:rPr><w:t>密★</w:t></w:r><w:r><w:t>1年</w:t></w:r></w:p><w:p><w:r><w:t>身份证 1101051949</w:t></w:r><w:r><w:t>1231002X</w:t></w:r><w:r><w:tab/><w:t>A&amp;B&#x4E2D;</w:t></w:r></w:p></w:body></w:document>"#,
            )],
        );
        let (t, _, _) = text_of(extract(&docx, Limits::default()));
        assert_eq!(t, "机密★1年\n身份证 11010519491231002X A&B中\n");
        let found = crate::classify::detectors::scan(&t);
        let names: Vec<&str> = found.iter().map(|f| f.detector.as_str()).collect();
        assert!(
            names.contains(&"mark:secret") && names.contains(&"prc-resident-id"),
            "{names:?}"
        );
        // Mobile numbers typed into cells are numbers, not strings; a shared-string
        // cell's value is an index and is not read as a number.
        let xlsx = office_file(
            dir.path(),
            "numbers.xlsx",
            &[
                ("xl/workbook.xml", "<workbook/>"),
                (
                    "xl/sharedStrings.xml",
                    r#"<sst><si><r><t>联系</t></r><r><t>电话</t></r></si></sst>"#,
                ),
                (
                    "xl/worksheets/sheet1.xml",
                    r#"<worksheet><sheetData><row><c r="A1" t="s"><v>0</v></c><c r="B1"><v>13812345678</v></c><c r="C1"><v>13912345678</v></c></row></sheetData></worksheet>"#,
                ),
            ],
        );
        let (t, _, _) = text_of(extract(&xlsx, Limits::default()));
        assert_eq!(t, "联系电话\n13812345678\n13912345678\n");
    }

    #[test]
    fn docx_xlsx_pptx_text_is_extracted() {
        let dir = tempfile::tempdir().unwrap();
        let docx = office_file(
            dir.path(),
            "a.docx",
            &[(
                "word/document.xml",
                r#"<w:document xmlns:w="x"><w:body><w:p><w:r><w:t>★机密★ 季度预算</w:t></w:r></w:p><w:p><w:r><w:t>身份证 11010519491231002X</w:t></w:r></w:p></w:body></w:document>"#,
            )],
        );
        let (t, f, _) = text_of(extract(&docx, Limits::default()));
        assert_eq!(f, "docx");
        assert!(
            t.contains("★机密★ 季度预算") && t.contains("11010519491231002X"),
            "{t}"
        );
        let xlsx = office_file(
            dir.path(),
            "b.xlsx",
            &[
                ("xl/workbook.xml", "<workbook/>"),
                (
                    "xl/sharedStrings.xml",
                    r#"<sst><si><t>客户卡号</t></si><si><t>4111111111111111</t></si></sst>"#,
                ),
                (
                    "xl/worksheets/sheet1.xml",
                    r#"<worksheet><sheetData><row><c t="inlineStr"><is><t>绝密</t></is></c></row></sheetData></worksheet>"#,
                ),
            ],
        );
        let (t, f, _) = text_of(extract(&xlsx, Limits::default()));
        assert_eq!(f, "xlsx");
        assert!(t.contains("4111111111111111") && t.contains("绝密"), "{t}");
        let pptx = office_file(
            dir.path(),
            "c.pptx",
            &[(
                "ppt/slides/slide1.xml",
                r#"<p:sld><a:t>Top Secret plan</a:t></p:sld>"#,
            )],
        );
        assert!(text_of(extract(&pptx, Limits::default()))
            .0
            .contains("Top Secret plan"));
    }

    #[test]
    fn gb18030_and_utf8_bom_are_decoded_binary_is_declared_broken_pdf_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (gb, _, _) = encoding_rs::GB18030.encode("机密文件，电话13812345678");
        std::fs::write(dir.path().join("gb.txt"), &gb).unwrap();
        let (t, f, _) = text_of(extract(&dir.path().join("gb.txt"), Limits::default()));
        assert_eq!((t.as_str(), f), ("机密文件，电话13812345678", "gb18030"));
        std::fs::write(
            dir.path().join("bom.csv"),
            "\u{feff}姓名,身份证\n张三,11010519491231002X\n",
        )
        .unwrap();
        assert_eq!(
            text_of(extract(&dir.path().join("bom.csv"), Limits::default())).1,
            "utf-8"
        );
        std::fs::write(dir.path().join("x.bin"), [0u8, 1, 2, 3, 0, 0]).unwrap();
        assert_eq!(
            extract(&dir.path().join("x.bin"), Limits::default()),
            Extracted::Unsupported("binary")
        );
        std::fs::write(dir.path().join("x.pdf"), b"%PDF-1.7\n...").unwrap();
        assert!(
            matches!(
                extract(&dir.path().join("x.pdf"), Limits::default()),
                Extracted::Failed(ref e) if e.starts_with("pdf")
            ),
            "a broken PDF is a failure, never 'nothing found'"
        );
    }

    #[test]
    fn utf16_and_text_with_a_little_noise_are_read_binary_is_not() {
        let text = "机密★1年\n员工 11010519491231002X，电话 13812345678\n";
        let utf16 = |big: bool, mark: bool| -> Vec<u8> {
            let mut out = Vec::new();
            if mark {
                out.extend_from_slice(if big { b"\xFE\xFF" } else { b"\xFF\xFE" });
            }
            for u in text.encode_utf16() {
                out.extend_from_slice(&if big {
                    u.to_be_bytes()
                } else {
                    u.to_le_bytes()
                });
            }
            out
        };
        for (bytes, format) in [
            (utf16(false, true), "utf-16le"),
            (utf16(true, true), "utf-16be"),
            (utf16(false, false), "utf-16le"),
        ] {
            match plain(&bytes, false, Limits::default()) {
                Extracted::Text {
                    text: t, format: f, ..
                } => assert_eq!((t.as_str(), f), (text, format)),
                other => panic!("{format}: {other:?}"),
            }
        }
        // Mostly-ASCII UTF-16 without a mark: every other byte is zero.
        let ascii: Vec<u8> = "staff id 11010519491231002X\n"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        assert!(matches!(
            plain(&ascii, false, Limits::default()),
            Extracted::Text {
                format: "utf-16le",
                ..
            }
        ));
        // Chinese text without a mark and a few ASCII digits: some zero bytes, too few
        // for the every-other-byte rule.
        let chinese =
            "关于下达二〇二六年部门预算的通知：请各单位于一月十日前报送，联系电话 13812345678。";
        let unmarked: Vec<u8> = chinese.encode_utf16().flat_map(u16::to_le_bytes).collect();
        match plain(&unmarked, false, Limits::default()) {
            Extracted::Text {
                text: t, format, ..
            } => {
                assert_eq!((t.as_str(), format), (chinese, "utf-16le"))
            }
            other => panic!("{other:?}"),
        }
        // One NUL byte at the start of a text file, a stray invalid byte inside.
        let mut noisy = vec![0u8];
        noisy.extend_from_slice(text.as_bytes());
        noisy.insert(20, 0xFF);
        match plain(&noisy, false, Limits::default()) {
            Extracted::Text {
                text: t, format, ..
            } => {
                assert_eq!(format, "utf-8");
                assert!(
                    t.contains("11010519491231002X") && t.contains("机密★1年"),
                    "{t}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Real binary: many zeros, or bytes no encoding reads as text.
        let elf: Vec<u8> = (0..4096u32)
            .map(|i| if i % 3 == 0 { 0 } else { (i * 7) as u8 })
            .collect();
        assert_eq!(
            plain(&elf, false, Limits::default()),
            Extracted::Unsupported("binary")
        );
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80)
            .collect();
        assert_eq!(
            plain(&noise, false, Limits::default()),
            Extracted::Unsupported("binary")
        );
    }

    /// A one-page PDF showing `line` in Helvetica, with a correct cross-reference table.
    #[test]
    fn a_pdf_with_a_cjk_identity_font_is_read_through_its_to_unicode_map() {
        let dir = tempfile::tempdir().unwrap();
        let pdf = dir.path().join("通知.pdf");
        std::fs::write(
            &pdf,
            samples::pdf_cjk(&[
                "机密★1年",
                "关于下达2026年预算的通知",
                "身份证号 11010519491231002X",
            ]),
        )
        .unwrap();
        let (t, f, _) = text_of(extract(&pdf, Limits::default()));
        assert_eq!(f, "pdf");
        let lines: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        assert_eq!(
            lines,
            [
                "机密★1年",
                "关于下达2026年预算的通知",
                "身份证号 11010519491231002X"
            ],
            "{t:?}"
        );
    }

    #[test]
    fn a_pdf_with_the_predefined_unigb_ucs2_cmap_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let pdf = dir.path().join("旧.pdf");
        std::fs::write(
            &pdf,
            samples::pdf_ucs2(&["秘密★启用前", "工资卡号 6222021234567890128"]),
        )
        .unwrap();
        let (t, f, _) = text_of(extract(&pdf, Limits::default()));
        assert_eq!(f, "pdf");
        assert!(
            t.contains("秘密★启用前") && t.contains("6222021234567890128"),
            "{t:?}"
        );
        // A predefined CMap of neither family is named, not a parser panic.
        std::fs::write(&pdf, ucs2_pdf_edited("/UniGB-UCS2-H", "/B5pc-H      ")).unwrap();
        assert_eq!(
            extract(&pdf, Limits::default()),
            Extracted::Failed("pdf: a font's encoding B5pc-H is not read".into())
        );
    }

    #[test]
    fn a_pdf_with_the_predefined_gbk_cmap_is_read_ascii_and_chinese_alike() {
        let dir = tempfile::tempdir().unwrap();
        let pdf = dir.path().join("旧.pdf");
        let lines = [
            "绝密★启用前",
            "身份证号 11010519491231002X，电话 13812345678",
            "€ 鍁",
        ];
        std::fs::write(&pdf, samples::pdf_gbk(&lines)).unwrap();
        let (t, f, _) = text_of(extract(&pdf, Limits::default()));
        assert_eq!(f, "pdf");
        for line in &lines[..2] {
            assert!(t.contains(line), "{line} in {t:?}");
        }
        // The map holds what was drawn, each code once: ASCII one byte, Chinese two.
        let codes = gbk_codes(&[
            encoding_rs::GBK.encode("A绝A").0.into_owned(),
            vec![0xFF, 0x81],
        ]);
        assert_eq!(codes.into_iter().collect::<Vec<_>>(), vec![0x41, 0xBEF8]);
    }

    #[test]
    fn rtf_in_gbk_bytes_and_unicode_escapes_is_read_headers_and_hidden_text_included() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("通知.rtf");
        for unicode in [false, true] {
            std::fs::write(
                &path,
                samples::rtf(
                    &["机密★1年"],
                    &["关于下达预算的通知", "身份证 11010519491231002X"],
                    unicode,
                ),
            )
            .unwrap();
            let (t, f, _) = text_of(extract(&path, Limits::default()));
            assert_eq!(f, "rtf");
            let lines: Vec<&str> = t.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            assert_eq!(
                lines,
                [
                    "机密★1年",
                    "关于下达预算的通知",
                    "身份证 11010519491231002X"
                ],
                "unicode escapes: {unicode}"
            );
        }
        // Text formatted hidden (\v) is read.
        std::fs::write(&path, "{\\rtf1\\ansi 公开 {\\v 11010519491231002X}\\par}").unwrap();
        let (t, _, _) = text_of(extract(&path, Limits::default()));
        assert!(t.contains("11010519491231002X"), "{t:?}");
    }

    /// `samples::pdf_ucs2(&["秘密"])` with `from` replaced by `to` of the same length
    /// (so the cross-reference offsets still hold).
    fn ucs2_pdf_edited(from: &str, to: &str) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        String::from_utf8_lossy(&samples::pdf_ucs2(&["秘密"]))
            .replace(from, to)
            .into_bytes()
    }

    #[test]
    fn a_pdf_whose_page_is_its_own_parent_is_refused_at_once() {
        // Found by the extract fuzz target: pdf-extract walks /Parent for inherited
        // resources and never returns, holding one of the two runaway reader slots.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loop.pdf");
        std::fs::write(&path, ucs2_pdf_edited("/Parent 2 0 R", "/Parent 3 0 R")).unwrap();
        assert_eq!(
            extract(&path, Limits::default()),
            Extracted::Failed("pdf: the page tree loops back at object 3 0".into())
        );
    }

    #[test]
    fn pdf_text_is_extracted_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pdf = dir.path().join("memo.pdf");
        std::fs::write(
            &pdf,
            samples::pdf("CONFIDENTIAL staff id 11010519491231002X"),
        )
        .unwrap();
        let (t, f, _) = text_of(extract(&pdf, Limits::default()));
        assert_eq!(f, "pdf");
        assert!(
            t.contains("CONFIDENTIAL") && t.contains("11010519491231002X"),
            "{t:?}"
        );
        let small = Limits {
            max_bytes: 100,
            ..Limits::default()
        };
        assert!(matches!(extract(&pdf, small), Extracted::Failed(ref e) if e.contains("limit")));
    }

    #[test]
    fn bounds_hold_for_big_files_and_zip_bombs() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_bytes: 1000,
            max_chars: 100_000,
            max_time: Duration::from_secs(5),
        };
        std::fs::write(dir.path().join("big.txt"), "机密".repeat(10_000)).unwrap();
        let (t, _, truncated) = text_of(extract(&dir.path().join("big.txt"), limits));
        assert!(truncated && t.len() <= 1000, "{}", t.len());
        // 50 MB of zeros inflates from a few KB: only the budget is read.
        let bomb = office_file(
            dir.path(),
            "bomb.docx",
            &[(
                "word/document.xml",
                &format!("<w:t>{}</w:t>", "0".repeat(50_000_000)),
            )],
        );
        assert!(std::fs::metadata(&bomb).unwrap().len() < 1_000_000);
        let (t, _, truncated) = text_of(extract(&bomb, limits));
        assert!(truncated && t.len() <= 1000);
    }
}
