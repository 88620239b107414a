//! What the fuzz targets share: a throw-away Weilan PKI (CA, one agent, the
//! collector), made once per fuzzing process, so signed messages reach the parsers
//! behind the signature check.

use std::sync::OnceLock;

use weilan_collector::pki::{self, PkiPaths};
use weilan_config::signing::{Signer, Verifier};

pub const AGENT: &str = "fz-agent";

pub struct Keys {
    pub agent: Signer,
    pub collector: Signer,
    pub verifier: Verifier,
    _dir: tempfile::TempDir,
}

/// The PKI, created on first use.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let paths = PkiPaths::new(dir.path());
        pki::init(&paths, &["localhost".to_string()]).expect("pki init");
        let (cert, key) = pki::issue_agent(&paths, AGENT).expect("agent certificate");
        Keys {
            agent: Signer::from_pem_files(&cert, &key).expect("agent signer"),
            collector: Signer::from_pem_files(&paths.collector(), &paths.collector_key())
                .expect("collector signer"),
            verifier: Verifier::from_ca_file(&paths.ca()).expect("verifier"),
            _dir: dir,
        }
    })
}

pub mod access_lines {
    //!  Login evidence: auth-log lines, `journalctl -o json` lines and wtmp records, all
    //!  of which other users' input (user names, remote hosts, terminals) can shape.
    use weilan_agent::source::access::{journal, parse, utmp};

    pub fn run(data: &[u8]) {
        let Some((mode, rest)) = data.split_first() else {
            return;
        };
        let text = String::from_utf8_lossy(rest);
        match mode % 3 {
            0 => {
                let (program, message) = text.split_once('\n').unwrap_or(("sshd", &text));
                let _ = parse::parse_message(program, message, "auth.log");
            }
            1 => {
                if let Some(entry) = journal::parse_entry(&text) {
                    let _ = parse::parse_message(&entry.program, &entry.message, "journal");
                }
            }
            _ => {
                let _ = utmp::parse_records(rest);
            }
        }
    }
}

pub mod agent_commands {
    //!  What an agent reads from its command, ack, policy, unlock and presence topics.
    //!  The first byte picks the purpose; odd inputs are signed with the real collector
    //!  key (reaching the decoders behind the signature), even ones are the raw payload.
    use super::{keys, AGENT};
    use weilan_config::signing::Role;
    use weilan_config::wire::{self, Ack, Command, PolicyPush, Presence, Purpose};

    const MAX: usize = 4 * 1024 * 1024;

    pub fn run(data: &[u8]) {
        let Some((mode, rest)) = data.split_first() else {
            return;
        };
        let purpose = match (mode / 2) % 5 {
            0 => Purpose::Command,
            1 => Purpose::Ack,
            2 => Purpose::Policy,
            3 => Purpose::Unlock,
            _ => Purpose::Presence,
        };
        let k = keys();
        let msg = if mode % 2 == 0 {
            match wire::decode_signed(rest, MAX) {
                Ok(m) => m,
                Err(_) => return,
            }
        } else {
            k.collector
                .sign(purpose, String::from_utf8_lossy(rest).into_owned())
        };
        if purpose == Purpose::Unlock {
            let _ = weilan_agent::unlock::verify(&k.verifier, &msg, AGENT);
            return;
        }
        if k.verifier.verify(&msg, purpose, Role::Collector).is_err() {
            return;
        }
        let body = msg.body.as_bytes();
        match purpose {
            Purpose::Command => {
                let _ = wire::decode::<Command>("a command", body, MAX);
            }
            Purpose::Ack => {
                let _ = wire::decode::<Ack>("an ack", body, MAX);
            }
            Purpose::Policy => {
                if let Ok(push) = wire::decode::<PolicyPush>("a policy push", body, MAX) {
                    let _ = weilan_config::policy::parse(&push.policy_toml, "pushed policy");
                }
            }
            _ => {
                let _ = wire::decode::<Presence>("a presence", body, MAX);
            }
        }
    }
}

pub mod badge {
    //!  Badge readers are USB keyboards: any key codes, in any order, any number.
    use weilan_agent::source::access::badge::{CardAssembler, Read, MAX_DIGITS};

    pub fn run(data: &[u8]) {
        let mut cards = CardAssembler::new(b"site badge key");
        for pair in data.chunks(2) {
            let code = u16::from_le_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            match code {
                0xfff0 => {
                    cards.abandon();
                }
                0xfff1 => cards.lost_input(),
                _ => {
                    if let Read::Card(card) = cards.press(code % 256) {
                        assert!(card.digits <= MAX_DIGITS);
                        assert_eq!(card.id_hash.len(), 64);
                        assert!(card.last4.len() <= 4);
                    }
                }
            }
        }
    }
}

pub mod extract {
    //!  Documents copied onto an exit point: text in any encoding, docx/xlsx/pptx (zip +
    //!  XML), PDF, Office 97 and WPS binaries, RTF, archives — extracted within bounds and
    //!  classified, through a file descriptor as the files source does it.
    use std::io::{Seek, SeekFrom, Write};
    use std::sync::{Mutex, OnceLock};
    use weilan_agent::classify::{extract, Classifier};

    fn classifier() -> &'static Classifier {
        static C: OnceLock<Classifier> = OnceLock::new();
        C.get_or_init(|| {
            let policy =
                weilan_config::policy::parse(weilan_config::examples::POLICY_TOML, "policy.toml")
                    .expect("the example policy");
            Classifier::from_policy(&policy.files, extract::Limits::default())
        })
    }

    /// libFuzzer aborts on any panic, even one a thread catches. The PDF library (and
    /// the crates it reads fonts and maps with) panics on many malformed files; the
    /// agent runs it on a thread of its own and turns a panic into `unreadable`
    /// (tested in `classify::extract`), so its panics are not findings. Any other
    /// panic — Weilan's own readers, cfb, the RTF parser — still aborts.
    fn contain_pdf_library_panics() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let fuzzer_hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let file = info.location().map(|l| l.file()).unwrap_or("");
                const PDF_LIBRARY: &[&str] = &[
                    "/pdf-extract-",
                    "/lopdf-",
                    "/adobe-cmap-parser-",
                    "/type1-encoding-parser-",
                    "/cff-parser-",
                ];
                if !PDF_LIBRARY.iter().any(|c| file.contains(c)) {
                    fuzzer_hook(info);
                }
            }));
        });
    }

    pub fn run(data: &[u8]) {
        contain_pdf_library_panics();
        // The agent decompresses 7z in a child process of its own program, with a
        // memory limit (classify/sevenz.rs); run from here that program would be this
        // fuzzer. No child is started (the path does not exist): a 7z input ends as
        // `unreadable`. (Not a program that exits at once: libFuzzer's process does not
        // ignore SIGPIPE as a Rust program does, and writing the archive to a child
        // that is gone would kill it.)
        weilan_agent::classify::sevenz::use_helper_program("/nonexistent/weilan-agent".into());
        static FILE: OnceLock<Mutex<std::fs::File>> = OnceLock::new();
        let file = FILE.get_or_init(|| Mutex::new(tempfile::tempfile().expect("temporary file")));
        let mut f = file.lock().unwrap();
        f.set_len(0).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(data).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let copy = f.try_clone().unwrap();
        let (classes, _error) = classifier().classify_file(copy);
        for c in classes {
            assert!(!c.detector.is_empty());
        }
    }
}

pub mod fs_superblock {
    //!  The first 2 KiB of a stick: FAT and ext superblocks, for label and UUID.
    use weilan_agent::source::usb::fsprobe::probe;

    pub fn run(data: &[u8]) {
        let id = probe(data);
        if let Some(label) = &id.label {
            assert!(
                label.len() <= 4 * 64,
                "label longer than any superblock field"
            );
        }
    }
}

pub mod journal_segment {
    //!  Journal segments read back after a crash or tampering. Most inputs are built from
    //!  frames with a correct CRC (so the JSON behind the CRC is reached), mixed with raw
    //!  damage; the first byte of each chunk says which.

    pub fn run(data: &[u8]) {
        let mut segment = Vec::with_capacity(data.len() + 64);
        for chunk in data.split(|b| *b == 0xff) {
            match chunk.split_first() {
                Some((kind, rest)) if kind % 4 != 0 => {
                    segment.extend_from_slice(&(rest.len() as u32).to_le_bytes());
                    segment.extend_from_slice(&crc32fast::hash(rest).to_le_bytes());
                    segment.extend_from_slice(rest);
                }
                Some((_, rest)) => segment.extend_from_slice(rest),
                None => {}
            }
        }
        weilan_agent::journal::fuzz_scan_segment(&segment);
    }
}

pub mod mountinfo {
    //!  `/proc/self/mountinfo` (and other namespaces' mountinfo): mount points a user
    //!  can name freely, escaped by the kernel.
    use weilan_agent::source::usb::mounts::parse;

    pub fn run(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let mounts = parse(&text);
        assert!(mounts.len() <= text.lines().count());
    }
}

pub mod policy_file {
    //!  The fence policy file (also what a push carries): TOML, validated whole.

    pub fn run(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            if let Err(errors) = weilan_config::policy::parse(text, "policy.toml") {
                // Every refusal says something.
                assert!(!errors.to_string().is_empty());
            }
        }
    }
}

pub mod rules_file {
    //!  A rules file: TOML, CEL conditions, message templates, durations.

    pub fn run(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            if let Err(errors) =
                weilan_collector::rules::file::parse(text, std::path::Path::new("rules.toml"))
            {
                assert!(!errors.to_string().is_empty());
            }
            let _ = weilan_collector::rules::file::parse_secs(text);
        }
    }
}

pub mod signed_batch {
    //!  What the collector reads from an agent's events topic: the signed envelope, the
    //!  batch inside it, every event record, and the rules' view of each event. Inputs
    //!  whose first byte is even are taken as the whole MQTT payload (so the signature
    //!  check itself is fuzzed); the others are a batch body signed with a real agent key,
    //!  so the fuzzer reaches the decoders behind the signature.
    use super::{keys, AGENT};
    use weilan_collector::rules::engine::Fact;
    use weilan_config::event::Envelope;
    use weilan_config::signing::Role;
    use weilan_config::wire::{self, Purpose};

    const MAX: usize = 1024 * 1024;

    pub fn run(data: &[u8]) {
        let Some((mode, rest)) = data.split_first() else {
            return;
        };
        let k = keys();
        if mode % 2 == 0 {
            let _ = wire::decode_signed(rest, MAX)
                .map(|m| k.verifier.verify(&m, Purpose::Batch, Role::Agent));
            let _ = weilan_config::topics::parse_agent_topic(&String::from_utf8_lossy(rest));
            return;
        }
        let body = String::from_utf8_lossy(rest).into_owned();
        let payload = serde_json::to_vec(&k.agent.sign(Purpose::Batch, body)).expect("serialise");
        let msg = wire::decode_signed(&payload, MAX).expect("a signed message we made decodes");
        let who = k
            .verifier
            .verify(&msg, Purpose::Batch, Role::Agent)
            .expect("our own signature verifies");
        assert_eq!(who.common_name, AGENT);
        let Ok(batch) = wire::decode_batch(&msg.body, MAX) else {
            return;
        };
        if wire::check_batch(&batch, &who.common_name).is_err() {
            return;
        }
        for raw in &batch.events {
            let Ok(env) = serde_json::from_str::<Envelope>(raw.get()) else {
                continue;
            };
            if wire::check_envelope(&env, &who.common_name).is_ok() {
                let _ = Fact::from_envelope(&env);
            }
        }
    }
}

pub mod uevent {
    //!  Kernel uevent messages from the netlink socket, as the USB source reads them,
    //!  and the sysfs directory each one names.
    use kobject_uevent::UEvent;
    use weilan_agent::source::usb::sysfs::Sysfs;

    pub fn run(data: &[u8]) {
        if let Ok(ev) = UEvent::from_netlink_packet(data) {
            let sysfs = Sysfs::new("/nonexistent-sysfs");
            let dir = sysfs.devpath_dir(&ev.devpath);
            // Whatever the message says, the directory stays under the sysfs root.
            assert!(dir.starts_with("/nonexistent-sysfs"), "{dir:?}");
            let _ = (ev.subsystem.len(), ev.env.len(), ev.seq);
        }
    }
}

pub mod usb_descriptors {
    //!  USB descriptors as sysfs hands them over (`descriptors`, written by the device),
    //!  and the strings a device reports about itself (manufacturer, product, serial).
    use weilan_agent::source::usb::sysfs::{clean_string, interfaces_from_descriptors};

    pub fn run(data: &[u8]) {
        let interfaces = interfaces_from_descriptors(data);
        // At most one interface per 9 bytes of descriptor, sorted by number.
        assert!(interfaces.len() <= data.len() / 9);
        assert!(interfaces.windows(2).all(|w| w[0].number <= w[1].number));
        let text = String::from_utf8_lossy(data);
        let clean = clean_string(&text);
        assert!(!clean.chars().any(char::is_control));
    }
}

pub mod journal_bundle {
    //!  Journal bundles carried on a stick from a host with no network (the collector's
    //!  `import`) and the ack bundles carried back (the agent's `import-ack`). Even
    //!  first bytes: the rest is the whole file. Odd: its lines are batch bodies, each
    //!  signed with the real agent key and closed by a manifest it signs, so the checks
    //!  behind the signatures (line digests, the chain walk naming an altered record)
    //!  are reached.
    use super::{keys, AGENT};
    use weilan_config::bundle::{self, BundleWriter};
    use weilan_config::event::EventKey;
    use weilan_config::wire::Purpose;

    pub fn run(data: &[u8]) {
        let Some((mode, rest)) = data.split_first() else {
            return;
        };
        let k = keys();
        if mode % 2 == 0 {
            let _ = bundle::check_bundle(&k.verifier, rest);
            for line in bundle::lines(rest) {
                let _ = bundle::altered_record(line);
            }
            let path = std::path::Path::new("fuzz.acks");
            let _ = weilan_agent::airgap::check_ack_bundle(&k.verifier, AGENT, path, rest);
            return;
        }
        let mut w = BundleWriter::new(Vec::new());
        let key = EventKey { epoch: 1, seq: 1 };
        for body in bundle::lines(rest) {
            let body = String::from_utf8_lossy(body).into_owned();
            let line = serde_json::to_vec(&k.agent.sign(Purpose::Batch, body)).expect("serialise");
            w.batch(&line, key, key, 1).expect("in memory");
        }
        let (_, bytes) = w.finish(&k.agent, AGENT).expect("in memory");
        if bytes.is_empty() {
            return;
        }
        let checked = bundle::check_bundle(&k.verifier, &bytes).expect("a bundle we signed checks");
        for line in checked.batch_lines {
            let _ = bundle::altered_record(line);
        }
    }
}
